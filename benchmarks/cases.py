"""What the benchmark measures: input builders, the methods compared, FLOP counts, checks.

Shared by ``bench_kernels.py`` (the side-by-side run) and ``test_bench_cpu.py`` (the
pytest-benchmark suite). Every method is built as ``build(inputs, case) -> loss_fn`` where
``loss_fn()`` returns the scalar loss of the case; the runner times ``loss_fn()`` under
``torch.no_grad()`` ("fwd") and ``loss_fn().backward()`` ("fwd+bwd").

Suites (``--only`` takes these names):

- ``vocab``: distillation loss from hidden states and lm_head weights (``fused_kd_loss``);
- ``logits``: the same loss on logits that are already materialized (``kd_loss``);
- ``multi_teacher``: K teachers fused by entropy weights (``multi_teacher_kd_loss``);
- ``attention``: attention-map alignment (``attention_kd_loss``);
- ``memory``: the CPU memory goal (N=1024, V=65536, H=128, fwd+bwd).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

LossFn = Callable[[], torch.Tensor]
Inputs = dict[str, torch.Tensor]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOGIT_STD = 8.0  # realistic logit spread (docs/design.md section 5), not torch.rand in [0, 1)
ENTROPY_TAU = 1.0
SIZE_KEYS = ("K", "N", "V", "Hs", "Ht", "B", "H", "Hkv", "L", "Ds", "Dt")


@dataclass(frozen=True)
class Case:
    """One shape of one suite; ``params`` holds the sizes, dtype and loss options."""

    suite: str
    name: str
    params: dict = field(hash=False)
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.params["dtype"]]


@dataclass(frozen=True)
class Skip:
    """Why a method is not timed; ``checkable``: it still runs the small oracle check."""

    reason: str
    checkable: bool = False


@dataclass(frozen=True)
class Method:
    """A way to compute a suite's loss; ``available`` returns None or a ``Skip``."""

    name: str
    build: Callable[[Inputs, Case], LossFn]
    available: Callable[[Case, str], Skip | None] = lambda case, device: None
    checked: bool = True  # False: not the same quantity (a cost scale), no oracle check


# ---------------------------------------------------------------------------------------------
# Inputs


def make_inputs(case: Case, device: str, seed: int = 0) -> Inputs:
    """Random inputs of ``case`` on ``device``; student tensors require grad.

    Linear heads: h ~ N(0, 1), W ~ N(0, std^2 / H), so logits have std about ``LOGIT_STD``.
    """
    p = case.params
    gen = torch.Generator().manual_seed(seed)
    dtype = case.dtype

    def randn(*shape: int, std: float = 1.0, grad: bool = False) -> torch.Tensor:
        t = (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    if case.suite in ("vocab", "memory", "multi_teacher"):
        n, v = p["N"], p["V"]
        inputs = {
            "h_s": randn(n, p["Hs"], grad=True),
            "w_s": randn(v, p["Hs"], std=LOGIT_STD / p["Hs"] ** 0.5, grad=True),
        }
        for k in range(p.get("K", 1)):
            inputs[f"h_t{k}"] = randn(n, p["Ht"])
            inputs[f"w_t{k}"] = randn(v, p["Ht"], std=LOGIT_STD / p["Ht"] ** 0.5)
        return inputs
    if case.suite == "logits":
        return {"z_s": randn(p["N"], p["V"], std=LOGIT_STD, grad=True),
                "z_t": randn(p["N"], p["V"], std=LOGIT_STD)}
    if case.suite == "attention":
        b, h, hkv, length = p["B"], p["H"], p["Hkv"], p["L"]
        # scores q.k / sqrt(D) with std about 3: peaked but not one-hot attention rows
        q_std = 3.0**0.5
        return {"q_s": randn(b, h, length, p["Ds"], std=q_std, grad=True),
                "k_s": randn(b, hkv, length, p["Ds"], std=q_std, grad=True),
                "q_t": randn(b, h, length, p["Dt"], std=q_std),
                "k_t": randn(b, hkv, length, p["Dt"], std=q_std)}
    raise ValueError(f"unknown suite {case.suite!r}")


def student_tensors(inputs: Inputs) -> list[torch.Tensor]:
    """The tensors that receive gradients (their ``.grad`` is cleared between runs)."""
    return [t for t in inputs.values() if t.requires_grad]


def input_bytes(inputs: Inputs) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values())


def teachers(inputs: Inputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(hidden, weight) of every teacher, in order."""
    count = sum(1 for key in inputs if key.startswith("h_t"))
    return [(inputs[f"h_t{k}"], inputs[f"w_t{k}"]) for k in range(count)]


# ---------------------------------------------------------------------------------------------
# FLOPs (docs/design.md sections 4 and 6)


def flops(case: Case, mode: str) -> float | None:
    """Useful FLOPs: the GEMMs the loss needs; None where no GEMM dominates (``logits``).

    Vocabulary losses: forward 2NV(Hs + K Ht), student gradients + 4NVHs. Attention: the two
    score GEMMs 2BHL^2(Ds + Dt), gradients dQ, dK + 4BHL^2 Ds, halved when causal.
    """
    p = case.params
    if case.suite in ("vocab", "memory", "multi_teacher"):
        n, v = p["N"], p["V"]
        total = 2 * n * v * (p["Hs"] + p.get("K", 1) * p["Ht"])
        return float(total + (4 * n * v * p["Hs"] if mode == "fwd+bwd" else 0))
    if case.suite == "attention":
        pairs = p["B"] * p["H"] * p["L"] ** 2 * (0.5 if p["causal"] else 1.0)
        return float(2 * pairs * (p["Ds"] + p["Dt"]) + (4 * pairs * p["Ds"] if mode == "fwd+bwd"
                                                        else 0))
    return None


# ---------------------------------------------------------------------------------------------
# Plain PyTorch: the losses a user would write, materializing logits / maps


def _divergence(log_q: torch.Tensor, log_p: torch.Tensor, divergence: str, beta: float):
    """Mean over tokens of KL(p || q) or the generalized JSD, as TRL's GKD writes it."""
    tokens = log_q.shape[0]
    if divergence == "kl":
        return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    if divergence == "jsd":
        log_m = torch.logsumexp(
            torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0
        )
        kl_pm = F.kl_div(log_m, log_p, log_target=True, reduction="sum")
        kl_qm = F.kl_div(log_m, log_q, log_target=True, reduction="sum")
        return (beta * kl_pm + (1 - beta) * kl_qm) / tokens
    raise ValueError(f"unsupported divergence {divergence!r}")


def plain_vocab(inputs: Inputs, case: Case) -> LossFn:
    """logits = h @ W.T in the input dtype, then float, log_softmax and the divergence."""
    p = case.params
    (h_t, w_t), = teachers(inputs)
    t = p["T"]

    def loss() -> torch.Tensor:
        log_q = F.log_softmax((inputs["h_s"] @ inputs["w_s"].T).float() / t, dim=-1)
        with torch.no_grad():
            log_p = F.log_softmax((h_t @ w_t.T).float() / t, dim=-1)
        return _divergence(log_q, log_p, p["divergence"], p["beta"])

    return loss


def plain_logits(inputs: Inputs, case: Case) -> LossFn:
    p = case.params

    def loss() -> torch.Tensor:
        log_q = F.log_softmax(inputs["z_s"].float() / p["T"], dim=-1)
        log_p = F.log_softmax(inputs["z_t"].float() / p["T"], dim=-1)
        return _divergence(log_q, log_p, p["divergence"], p["beta"])

    return loss


def plain_multi_teacher(inputs: Inputs, case: Case) -> LossFn:
    """Entropy-weighted mixture of materialized teacher distributions, KL(mixture || q)."""
    t = case.params["T"]
    heads = teachers(inputs)

    def loss() -> torch.Tensor:
        log_q = F.log_softmax((inputs["h_s"] @ inputs["w_s"].T).float() / t, dim=-1)
        with torch.no_grad():
            log_p = torch.stack([F.log_softmax((h @ w.T).float() / t, dim=-1) for h, w in heads])
            entropy = -(log_p.exp() * log_p).sum(-1)  # (K, N)
            prior = math.log(1.0 / len(heads))
            weights = torch.softmax(prior - entropy / ENTROPY_TAU, dim=0)  # (K, N)
            log_mix = torch.logsumexp(log_p + weights.log()[:, :, None], dim=0)  # (N, V)
        return F.kl_div(log_q, log_mix, log_target=True, reduction="batchmean")

    return loss


def _attention_maps(q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)).float() / q.shape[-1] ** 0.5
    if causal:
        length = q.shape[2]
        mask = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def plain_attention(inputs: Inputs, case: Case) -> LossFn:
    """Materialized (B, H, L, L) maps of student and teacher, ``F.mse_loss`` (or row KL)."""
    p = case.params

    def loss() -> torch.Tensor:
        a_s = _attention_maps(inputs["q_s"], inputs["k_s"], p["causal"])
        with torch.no_grad():
            a_t = _attention_maps(inputs["q_t"], inputs["k_t"], p["causal"])
        if p["loss"] == "mse":
            return F.mse_loss(a_s, a_t)
        log_s = torch.log(a_s.clamp_min(1e-30))
        return F.kl_div(log_s.flatten(0, 2), a_t.flatten(0, 2), reduction="batchmean")

    return loss


def sdpa_attention(inputs: Inputs, case: Case) -> LossFn:
    """The student's own attention (SDPA, v = k): what one attention layer costs."""
    q, k = inputs["q_s"], inputs["k_s"]

    def loss() -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, k, k, is_causal=case.params["causal"],
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out.float().sum()

    return loss


class _FloorGemms(torch.autograd.Function):
    """Forward: the logit GEMMs. Backward: the two gradient GEMMs with a fixed dlogits."""

    @staticmethod
    def forward(ctx, h_s, w_s, dlogits, heads):
        ctx.save_for_backward(h_s, w_s, dlogits)
        total = (h_s @ w_s.T)[0, 0].float()
        for h, w in heads:
            total = total + (h @ w.T)[0, 0].float()
        return total

    @staticmethod
    def backward(ctx, grad_output):
        h_s, w_s, dlogits = ctx.saved_tensors
        return dlogits @ w_s, dlogits.T @ h_s, None, None


def matmul_floor(inputs: Inputs, case: Case) -> LossFn:
    """Only the GEMMs the loss needs, in the input dtype: the matmul floor.

    Forward: student and teacher logits (N, V); backward: dlogits W_s and dlogits^T h_s with a
    fixed (N, V) dlogits, so fwd+bwd runs exactly 2NV(Hs + K Ht) + 4NVHs FLOPs.
    """
    h_s, w_s = inputs["h_s"], inputs["w_s"]
    dlogits = torch.randn(h_s.shape[0], w_s.shape[0], device=h_s.device).to(h_s.dtype)
    heads = teachers(inputs)
    return lambda: _FloorGemms.apply(h_s, w_s, dlogits, heads)


def compiled(build: Callable[[Inputs, Case], LossFn]) -> Callable[[Inputs, Case], LossFn]:
    """The same plain loss under ``torch.compile`` (compiled in the warm-up call)."""
    return lambda inputs, case: torch.compile(build(inputs, case))


def compile_available(case: Case, device: str) -> Skip | None:
    if device == "cpu" and not case.params.get("compile_cpu", False):
        return Skip("torch.compile on CPU: the inductor C++ build of every shape costs more than "
                    "the whole default run; pass --compile-cpu to include it")
    return None


# ---------------------------------------------------------------------------------------------
# The bytes-and-FLOPs model's prediction (fastkd/plan.py), printed beside the measured times


def predicted(case: Case, device: str) -> dict | None:
    """fastkd's plan for the case and its predicted fwd+bwd time on this GPU's peak figures
    (H100 or H200 datasheet values); None on CPU, for other suites and for other GPUs."""
    if device != "cuda" or case.suite not in ("vocab", "multi_teacher"):
        return None
    from fastkd.plan import H100, H200, plan_chunks, predict

    name = torch.cuda.get_device_name()
    machine = H200 if "H200" in name else H100 if "H100" in name else None
    if machine is None:
        return None
    p = case.params
    widths = (p["Hs"], *[p["Ht"]] * p.get("K", 1))
    half = p["dtype"] != "fp32"
    plan = plan_chunks(p["V"], len(widths) - 1, "triton", half, device_type="cuda",
                       widths=widths, tokens=p["N"])
    cost = predict(plan, p["N"], p["V"], p["Hs"], widths[1:], 2 if half else 4, machine)
    return {"machine": machine.name, "rows": plan.rows, "grad_rows": plan.grad_rows,
            "fwd+bwd_ms": cost.seconds * 1e3, "floor_ms": cost.floor * 1e3}


# ---------------------------------------------------------------------------------------------
# fastkd


def _fastkd_public(name: str) -> Callable | None:
    import fastkd

    return getattr(fastkd, name, None)


def fastkd_available(function: str, backend: str) -> Callable[[Case, str], Skip | None]:
    def available(case: Case, device: str) -> Skip | None:
        if _fastkd_public(function) is None:
            return Skip(f"fastkd.{function} is not importable yet (not exported by fastkd)")
        if backend == "triton" and device == "cpu":
            return Skip("the triton backend runs on CPU only in the Triton interpreter, far too "
                        "slow to time; checked against the oracle at the small shape only",
                        checkable=True)
        native_device = {"cpp": "cpu", "cuda": "cuda"}.get(backend, device)
        if native_device != device:
            return Skip(f"the {backend} backend runs on {native_device} tensors only")
        if backend in ("cpp", "cuda"):
            from fastkd import csrc

            if not csrc.load():
                return Skip("the C++ extension did not build (see the warning)")
        return None

    return available


def fastkd_vocab(backend: str) -> Callable[[Inputs, Case], LossFn]:
    def build(inputs: Inputs, case: Case) -> LossFn:
        from fastkd import fused_kd_loss

        p = case.params
        (h_t, w_t), = teachers(inputs)
        kwargs = dict(divergence=p["divergence"], beta=p["beta"], temperature=p["T"],
                      backend=backend, chunk_size=p.get("chunk_size"))
        return lambda: fused_kd_loss(inputs["h_s"], inputs["w_s"], h_t, w_t, **kwargs)

    return build


def fastkd_logits(backend: str) -> Callable[[Inputs, Case], LossFn]:
    def build(inputs: Inputs, case: Case) -> LossFn:
        from fastkd import kd_loss

        p = case.params
        kwargs = dict(divergence=p["divergence"], beta=p["beta"], temperature=p["T"],
                      backend=backend)
        return lambda: kd_loss(inputs["z_s"], inputs["z_t"], **kwargs)

    return build


def fastkd_multi_teacher(backend: str) -> Callable[[Inputs, Case], LossFn]:
    def build(inputs: Inputs, case: Case) -> LossFn:
        multi_teacher_kd_loss = _fastkd_public("multi_teacher_kd_loss")
        heads = teachers(inputs)
        kwargs = dict(temperature=case.params["T"], weighting="entropy", fusion="mixture",
                      entropy_tau=ENTROPY_TAU, backend=backend)
        return lambda: multi_teacher_kd_loss(inputs["h_s"], inputs["w_s"],
                                             [h for h, _ in heads], [w for _, w in heads],
                                             **kwargs)

    return build


def fastkd_attention(backend: str) -> Callable[[Inputs, Case], LossFn]:
    def build(inputs: Inputs, case: Case) -> LossFn:
        attention_kd_loss = _fastkd_public("attention_kd_loss")
        p = case.params
        return lambda: attention_kd_loss(inputs["q_s"], inputs["k_s"], inputs["q_t"],
                                         inputs["k_t"], loss=p["loss"], causal=p["causal"],
                                         backend=backend)

    return build


# ---------------------------------------------------------------------------------------------
# Liger-Kernel (optional; its kernels need a GPU)


def liger_available(divergences: tuple[str, ...]) -> Callable[[Case, str], Skip | None]:
    def available(case: Case, device: str) -> Skip | None:
        if case.params["divergence"] not in divergences:
            return Skip(f"this Liger op has no divergence {case.params['divergence']!r}")
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return Skip("liger_kernel is not installed (pip install liger-kernel)")
        if device == "cpu":
            return Skip("Liger-Kernel's Triton kernels need a GPU")
        return None

    return available


def liger_fused_linear_jsd(inputs: Inputs, case: Case) -> LossFn:
    """``LigerFusedLinearJSD``: hidden states and lm_head weights in, generalized JSD out."""
    from liger_kernel.transformers import LigerFusedLinearJSD

    p = case.params
    (h_t, w_t), = teachers(inputs)
    module = LigerFusedLinearJSD(jsd_beta=p["beta"], temperature=p["T"])
    return lambda: module(inputs["h_s"], inputs["w_s"], h_t, w_t, None)  # no shift_labels


def liger_fused_linear_kl(inputs: Inputs, case: Case) -> LossFn:
    """``LigerFusedLinearKLDivLoss``: the student's lm_head GEMM fused with KL; its API takes
    the teacher's probabilities, so they are materialized (inside the timed call)."""
    from liger_kernel.transformers import LigerFusedLinearKLDivLoss

    p = case.params
    (h_t, w_t), = teachers(inputs)
    module = LigerFusedLinearKLDivLoss(reduction="batchmean", temperature=p["T"])

    def loss() -> torch.Tensor:
        with torch.no_grad():
            target = torch.softmax((h_t @ w_t.T).float() / p["T"], dim=-1)
        return module(inputs["h_s"], inputs["w_s"], target)

    return loss


def liger_logits(inputs: Inputs, case: Case) -> LossFn:
    """``LigerKLDIVLoss`` / ``LigerJSD`` on log-softmaxed materialized logits."""
    from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss

    p = case.params
    if p["divergence"] == "kl":
        op = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    else:
        op = LigerJSD(beta=p["beta"])

    def loss() -> torch.Tensor:
        log_q = F.log_softmax(inputs["z_s"].float() / p["T"], dim=-1)
        log_p = F.log_softmax(inputs["z_t"].float() / p["T"], dim=-1)
        return op(log_q, log_p)

    return loss


# ---------------------------------------------------------------------------------------------
# The methods of each suite, in table order


def _vocab_methods(fastkd_function: str, fastkd_build, plain, liger=()) -> list[Method]:
    methods = [
        Method("matmul floor", matmul_floor, checked=False),
        Method("torch (materialized)", plain),
        Method("torch.compile", compiled(plain), compile_available),
        *liger,
    ]
    return methods + fastkd_methods(fastkd_function, fastkd_build)


def fastkd_methods(function: str, build) -> list[Method]:
    """fastkd's backends: torch, triton, and the C++ row ops (cpp on CPU, cuda on a GPU)."""
    return [Method(f"fastkd {backend}", build(backend), fastkd_available(function, backend))
            for backend in ("torch", "triton", "cpp", "cuda")]


METHODS: dict[str, list[Method]] = {
    "vocab": _vocab_methods(
        "fused_kd_loss", fastkd_vocab, plain_vocab,
        [Method("liger fused-linear JSD", liger_fused_linear_jsd, liger_available(("jsd",))),
         Method("liger fused-linear KL", liger_fused_linear_kl, liger_available(("kl",)))],
    ),
    "memory": [
        Method("torch (materialized)", plain_vocab),
        Method("fastkd torch", fastkd_vocab("torch"), fastkd_available("fused_kd_loss", "torch")),
        Method("fastkd cpp", fastkd_vocab("cpp"), fastkd_available("fused_kd_loss", "cpp")),
    ],
    "logits": [
        Method("torch (materialized)", plain_logits),
        Method("torch.compile", compiled(plain_logits), compile_available),
        Method("liger KL/JSD op", liger_logits, liger_available(("kl", "jsd"))),
        *fastkd_methods("kd_loss", fastkd_logits),
    ],
    "multi_teacher": _vocab_methods("multi_teacher_kd_loss", fastkd_multi_teacher,
                                    plain_multi_teacher),
    "attention": [
        Method("sdpa (student, cost scale)", sdpa_attention, checked=False),
        Method("torch (materialized)", plain_attention),
        Method("torch.compile", compiled(plain_attention), compile_available),
        Method("fastkd torch", fastkd_attention("torch"),
               fastkd_available("attention_kd_loss", "torch")),
        Method("fastkd triton", fastkd_attention("triton"),
               fastkd_available("attention_kd_loss", "triton")),
    ],
}

# The row every other row of a suite is divided by in the "x ref" column.
REFERENCE_METHOD = {"vocab": "matmul floor", "multi_teacher": "matmul floor",
                    "attention": "sdpa (student, cost scale)"}
BASELINE_METHOD = "torch (materialized)"  # the "extra vs torch" column divides by this row


# ---------------------------------------------------------------------------------------------
# Correctness against the float64 oracles


def check_case(case: Case) -> Case:
    """A small, odd-sized case of the same suite, dtype and loss options (for the oracle)."""
    small = {"vocab": dict(N=67, V=3001, Hs=64, Ht=96),
             "memory": dict(N=67, V=3001, Hs=64, Ht=64),
             "multi_teacher": dict(N=67, V=3001, Hs=64, Ht=96),
             "logits": dict(N=67, V=3001),
             "attention": dict(B=2, L=61, Ds=32, Dt=48)}[case.suite]
    params = {**case.params, **small}
    sizes = " ".join(f"{k}={v}" for k, v in params.items() if k in SIZE_KEYS)
    loss = params.get("divergence") if case.suite != "attention" else params["loss"]
    name = f"{case.suite} {sizes} {params['dtype']} {loss}"
    return Case(case.suite, name, params, ("fwd+bwd",))


def reference_loss(inputs: Inputs, case: Case) -> torch.Tensor:
    """The float64 oracle of the case, differentiable with respect to the student tensors."""
    p = case.params
    options = dict(temperature=p["T"])
    if case.suite in ("vocab", "memory"):
        from fastkd.reference import fused_kd_loss_reference

        (h_t, w_t), = teachers(inputs)
        return fused_kd_loss_reference(inputs["h_s"], inputs["w_s"], h_t, w_t,
                                       divergence=p["divergence"], beta=p["beta"], **options)
    if case.suite == "logits":
        from fastkd.reference import kd_loss_reference

        return kd_loss_reference(inputs["z_s"], inputs["z_t"], divergence=p["divergence"],
                                 beta=p["beta"], **options)
    if case.suite == "multi_teacher":
        from fastkd.reference import multi_teacher_kd_loss_reference

        heads = teachers(inputs)
        return multi_teacher_kd_loss_reference(
            inputs["h_s"], inputs["w_s"], [h for h, _ in heads], [w for _, w in heads],
            weighting="entropy", fusion="mixture", entropy_tau=ENTROPY_TAU, **options)
    from fastkd.reference_attention import attention_kd_loss_reference

    return attention_kd_loss_reference(inputs["q_s"], inputs["k_s"], inputs["q_t"],
                                       inputs["k_t"], loss=p["loss"], causal=p["causal"])


def tolerance(dtype: torch.dtype) -> float:
    """docs/design.md section 5: fp32 under 1e-4, bf16 / fp16 under 1e-2."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 1e-2


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or inf anywhere gives inf."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return math.inf
    denom = ref.norm()
    return float((out - ref).norm() / denom) if denom > 0 else float((out - ref).norm())


def check_method(method: Method, case: Case, device: str) -> float:
    """Largest relative error of the loss and every student gradient against the oracle."""
    small = check_case(case)
    inputs = make_inputs(small, device, seed=1)
    loss = method.build(inputs, small)()
    grads = torch.autograd.grad(loss, student_tensors(inputs))
    ref_inputs = {k: v.detach().double().requires_grad_(v.requires_grad)
                  for k, v in inputs.items()}
    ref = reference_loss(ref_inputs, small)
    ref_grads = torch.autograd.grad(ref, student_tensors(ref_inputs))
    return max(relative_error(a, b) for a, b in zip((loss, *grads), (ref, *ref_grads)))
