"""fastkd's row ops registered with ``torch.library``, so ``torch.compile`` traces every loss.

One schema per kind of op, one op name per backend, and one fake (meta) kernel per schema that
every backend of it shares. The fake gives shapes and dtypes only; the real kernels run
outside the traced graph, as opaque calls.

Row ops (the chunk driver calls one per chunk of C tokens, V the vocab, K teachers)::

    fastkd::kd_rows_{torch,triton}          (C, V), (C, V)    -> loss (C,)
    fastkd::multi_teacher_rows_{torch,triton}  (C, V), (K, C, V) -> loss (C,), weights (C, K)
    fastkd::sparse_kd_rows_{torch,triton}   (C, V), ids (C, k), logits (C, k), lse (C,)
                                            -> loss (C,)

``grad_out`` (C, V), when given, receives d loss / d z_s; it may be the same tensor as
``student_logits`` (every element is read before it is overwritten). The loss is fp32 (fp64
for fp64 student logits). The C++ / CUDA C++ ops of csrc/ (``fastkd::kd_rows``,
``fastkd::multi_teacher_rows``, defined by ``TORCH_LIBRARY(fastkd, m)``) take the same schemas;
``register_native_fakes()`` gives them the same fake kernels once the extension is loaded.

``ROW_OPS`` maps a backend name to its ops; ``row_op(backend, kind)`` looks one up. A new
backend plugs in by defining ops with these schemas (in C++ or with ``define_kd_rows`` /
``define_multi_teacher_rows``), adding a row to ``ROW_OPS`` and, for ops defined outside this
file, calling ``register_fakes`` with their names.

Attention ops (``attention_kd_loss``; q_s (B, H, L, Ds), k_s (B, Hs_kv, L, Ds), q_t (B, H, L,
Dt), k_t (B, Ht_kv, L, Dt), real (B, L) int8 (Triton) or bool (torch) or None)::

    fastkd::attention_forward_triton   -> row_loss, lse_s, lse_t, delta   (B, H, L) fp32 each
                                          (delta is (0,) for loss="kl")
    fastkd::attention_backward_triton  -> dq (B, H, L, Ds), dk (B, Hs_kv, L, Ds)
    fastkd::attention_forward_torch    -> row_loss (B, H, L) in q_s's dtype (fp32 / fp64)
    fastkd::attention_backward_torch   -> dq, dk
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fastkd.options import KDOptions, MultiTeacherOptions

KD_ROWS_SCHEMA = (
    "(Tensor student_logits, Tensor teacher_logits, Tensor? labels, Tensor(a!)? grad_out, "
    "str divergence, float beta, float temperature, float soft_weight, float hard_weight, "
    "int ignore_index, float student_softcap, float student_scale, float teacher_softcap, "
    "float teacher_scale) -> Tensor"
)
MULTI_TEACHER_ROWS_SCHEMA = (
    "(Tensor student_logits, Tensor teacher_logits, Tensor? labels, Tensor(a!)? grad_out, "
    "Tensor(b!) weights_out, float[] priors, float temperature, str weighting, "
    "float entropy_tau, str fusion, float soft_weight, float hard_weight, int ignore_index, "
    "float student_softcap, float student_scale, float[] teacher_softcaps, "
    "float[] teacher_scales) -> Tensor"
)
SPARSE_KD_ROWS_SCHEMA = (
    "(Tensor student_logits, Tensor teacher_ids, Tensor teacher_logits, Tensor teacher_lse, "
    "Tensor? labels, Tensor(a!)? grad_out, str tail, str divergence, float temperature, "
    "float soft_weight, float hard_weight, int ignore_index, float student_softcap, "
    "float student_scale) -> Tensor"
)

# backend -> {kind: op name in the fastkd namespace}; kinds: "kd_rows", "multi_teacher_rows",
# "sparse_kd_rows"
ROW_OPS: dict[str, dict[str, str]] = {
    "torch": {"kd_rows": "kd_rows_torch", "multi_teacher_rows": "multi_teacher_rows_torch",
              "sparse_kd_rows": "sparse_kd_rows_torch"},
    "triton": {"kd_rows": "kd_rows_triton", "multi_teacher_rows": "multi_teacher_rows_triton",
               "sparse_kd_rows": "sparse_kd_rows_triton"},
    "cpp": {"kd_rows": "kd_rows", "multi_teacher_rows": "multi_teacher_rows",
            "sparse_kd_rows": "sparse_kd_rows"},
    "cuda": {"kd_rows": "kd_rows", "multi_teacher_rows": "multi_teacher_rows",
             "sparse_kd_rows": "sparse_kd_rows"},
}
# Ops defined in C++ (csrc/): their fakes are registered once the extension is loaded.
# addmm_fp32 is the CPU's half GEMM with fp32 output (fastkd/matmul.py), not a row op.
NATIVE_OPS = {"kd_rows": "kd_rows", "multi_teacher_rows": "multi_teacher_rows",
              "sparse_kd_rows": "sparse_kd_rows", "addmm_fp32": "addmm_fp32"}


def row_op(backend: str, kind: str) -> torch._ops.OpOverload:
    """The op of ``kind`` ("kd_rows", "multi_teacher_rows", "sparse_kd_rows") for ``backend``."""
    return getattr(torch.ops.fastkd, ROW_OPS[backend][kind]).default


# ---- the options dataclasses, unpacked into op arguments (the one place that does it)


def kd_arguments(options: KDOptions) -> tuple:
    """The scalar arguments of a kd_rows op after (student, teacher, labels, grad_out)."""
    return (options.divergence, float(options.beta), float(options.temperature),
            float(options.soft_weight), float(options.hard_weight), int(options.ignore_index),
            float(options.student_softcap), float(options.student_scale),
            float(options.teacher_softcap), float(options.teacher_scale))


def multi_teacher_arguments(options: MultiTeacherOptions) -> tuple:
    """The arguments of a multi_teacher_rows op after (student, teachers, labels, grad_out,
    weights_out)."""
    return ([float(p) for p in options.priors], float(options.temperature), options.weighting,
            float(options.entropy_tau), options.fusion, float(options.soft_weight),
            float(options.hard_weight), int(options.ignore_index),
            float(options.student_softcap), float(options.student_scale),
            [float(c) for c in options.teacher_softcaps],
            [float(a) for a in options.teacher_scales])


def sparse_kd_arguments(tail: str, options: KDOptions) -> tuple:
    """The arguments of a sparse_kd_rows op after (student, ids, logits, lse, labels,
    grad_out)."""
    return (tail, options.divergence, float(options.temperature), float(options.soft_weight),
            float(options.hard_weight), int(options.ignore_index),
            float(options.student_softcap), float(options.student_scale))


def _kd_options(divergence, beta, temperature, soft_weight, hard_weight, ignore_index,
                student_softcap=0.0, student_scale=1.0, teacher_softcap=0.0, teacher_scale=1.0):
    return KDOptions(divergence=divergence, beta=beta, temperature=temperature,
                     soft_weight=soft_weight, hard_weight=hard_weight, ignore_index=ignore_index,
                     student_softcap=student_softcap, student_scale=student_scale,
                     teacher_softcap=teacher_softcap, teacher_scale=teacher_scale)


def _multi_teacher_options(priors, temperature, weighting, entropy_tau, fusion, soft_weight,
                           hard_weight, ignore_index, student_softcap, student_scale,
                           teacher_softcaps, teacher_scales):
    return MultiTeacherOptions(priors=tuple(priors), temperature=temperature,
                               weighting=weighting, entropy_tau=entropy_tau, fusion=fusion,
                               soft_weight=soft_weight, hard_weight=hard_weight,
                               ignore_index=ignore_index, student_softcap=student_softcap,
                               student_scale=student_scale,
                               teacher_softcaps=tuple(teacher_softcaps),
                               teacher_scales=tuple(teacher_scales))


def _loss_dtype(student_logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if student_logits.dtype == torch.float64 else torch.float32


# ---- fake kernels: one per schema, shared by every backend


def kd_rows_fake(student_logits, teacher_logits, labels, grad_out, divergence, beta,
                 temperature, soft_weight, hard_weight, ignore_index, student_softcap,
                 student_scale, teacher_softcap, teacher_scale) -> torch.Tensor:
    """Per-token loss (C,) of student logits (C, V): fp32, fp64 for fp64 logits."""
    torch._check(student_logits.dim() == 2, lambda: "student_logits must be (C, V)")
    torch._check(teacher_logits.shape == student_logits.shape,
                 lambda: "teacher_logits must have the shape of student_logits (C, V)")
    return student_logits.new_empty(student_logits.shape[0], dtype=_loss_dtype(student_logits))


def multi_teacher_rows_fake(student_logits, teacher_logits, labels, grad_out, weights_out,
                            priors, temperature, weighting, entropy_tau, fusion, soft_weight,
                            hard_weight, ignore_index, student_softcap, student_scale,
                            teacher_softcaps, teacher_scales) -> torch.Tensor:
    """Per-token loss (C,) of student logits (C, V) against teachers (K, C, V)."""
    torch._check(student_logits.dim() == 2, lambda: "student_logits must be (C, V)")
    torch._check(teacher_logits.dim() == 3 and teacher_logits.shape[1:] == student_logits.shape,
                 lambda: "teacher_logits must be (K, C, V)")
    return student_logits.new_empty(student_logits.shape[0], dtype=_loss_dtype(student_logits))


def sparse_kd_rows_fake(student_logits, teacher_ids, teacher_logits, teacher_lse, labels,
                        grad_out, tail, divergence, temperature, soft_weight, hard_weight,
                        ignore_index, student_softcap, student_scale) -> torch.Tensor:
    """Per-token loss (C,) of student logits (C, V) against ids and logits (C, k), lse (C,)."""
    torch._check(student_logits.dim() == 2, lambda: "student_logits must be (C, V)")
    torch._check(teacher_ids.dim() == 2 and teacher_ids.shape[0] == student_logits.shape[0]
                 and teacher_logits.shape == teacher_ids.shape,
                 lambda: "teacher_ids and teacher_logits must be (C, k)")
    torch._check(teacher_lse.shape == (student_logits.shape[0],),
                 lambda: "teacher_lse must be (C,)")
    return student_logits.new_empty(student_logits.shape[0], dtype=_loss_dtype(student_logits))


def addmm_fp32_fake(out, a, b, beta) -> None:
    """out (M, N) fp32 += a (M, K) @ b (K, N) in place: no output, shapes only."""
    torch._check(a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[0]
                 and tuple(out.shape) == (a.shape[0], b.shape[1]),
                 lambda: "addmm_fp32 needs out (M, N), a (M, K), b (K, N)")


FAKES = {"kd_rows": kd_rows_fake, "multi_teacher_rows": multi_teacher_rows_fake,
         "sparse_kd_rows": sparse_kd_rows_fake, "addmm_fp32": addmm_fp32_fake}
_FAKED: set[str] = set()


def register_fakes(kind: str, name: str) -> None:
    """Register the fake kernel of ``kind``'s schema for the op ``fastkd::<name>`` (once)."""
    if name in _FAKED:
        return
    torch.library.register_fake(f"fastkd::{name}", FAKES[kind])
    _FAKED.add(name)


def register_native_fakes() -> None:
    """Fakes for the C++ ops of csrc/; call after the extension has loaded them."""
    for kind, name in NATIVE_OPS.items():
        if hasattr(torch.ops.fastkd, name):
            register_fakes(kind, name)


def define_kd_rows(name: str, kernel: Callable[..., torch.Tensor]) -> None:
    """Define ``fastkd::<name>`` with the kd_rows schema from a Python row op
    ``kernel(student_logits, teacher_logits, labels, grad_out, options: KDOptions)``."""

    def impl(student_logits, teacher_logits, labels, grad_out, divergence, beta, temperature,
             soft_weight, hard_weight, ignore_index, student_softcap, student_scale,
             teacher_softcap, teacher_scale):
        options = _kd_options(divergence, beta, temperature, soft_weight, hard_weight,
                              ignore_index, student_softcap, student_scale, teacher_softcap,
                              teacher_scale)
        loss = kernel(student_logits, teacher_logits, labels, grad_out, options)
        return loss.to(_loss_dtype(student_logits))

    torch.library.custom_op(f"fastkd::{name}", impl, mutates_args=("grad_out",),
                            schema=KD_ROWS_SCHEMA)
    register_fakes("kd_rows", name)


def define_multi_teacher_rows(name: str, kernel: Callable[..., torch.Tensor]) -> None:
    """Define ``fastkd::<name>`` with the multi_teacher_rows schema from a Python row op
    ``kernel(student_logits, teacher_logits, labels, grad_out, options, weights_out)``."""

    def impl(student_logits, teacher_logits, labels, grad_out, weights_out, priors, temperature,
             weighting, entropy_tau, fusion, soft_weight, hard_weight, ignore_index,
             student_softcap, student_scale, teacher_softcaps, teacher_scales):
        options = _multi_teacher_options(priors, temperature, weighting, entropy_tau, fusion,
                                         soft_weight, hard_weight, ignore_index,
                                         student_softcap, student_scale, teacher_softcaps,
                                         teacher_scales)
        loss = kernel(student_logits, teacher_logits, labels, grad_out, options, weights_out)
        return loss.to(_loss_dtype(student_logits))

    torch.library.custom_op(f"fastkd::{name}", impl, mutates_args=("grad_out", "weights_out"),
                            schema=MULTI_TEACHER_ROWS_SCHEMA)
    register_fakes("multi_teacher_rows", name)


def define_sparse_kd_rows(name: str, kernel: Callable[..., torch.Tensor]) -> None:
    """Define ``fastkd::<name>`` with the sparse_kd_rows schema from a Python row op
    ``kernel(student_logits, ids, logits, lse, labels, grad_out, tail, options: KDOptions)``."""

    def impl(student_logits, teacher_ids, teacher_logits, teacher_lse, labels, grad_out, tail,
             divergence, temperature, soft_weight, hard_weight, ignore_index, student_softcap,
             student_scale):
        options = _kd_options(divergence, 0.5, temperature, soft_weight, hard_weight,
                              ignore_index, student_softcap, student_scale)
        loss = kernel(student_logits, teacher_ids, teacher_logits, teacher_lse, labels,
                      grad_out, tail, options)
        return loss.to(_loss_dtype(student_logits))

    torch.library.custom_op(f"fastkd::{name}", impl, mutates_args=("grad_out",),
                            schema=SPARSE_KD_ROWS_SCHEMA)
    register_fakes("sparse_kd_rows", name)


def _triton_kd_rows(*args):
    from fastkd.kernels.kd_rows import kd_rows

    return kd_rows(*args)


def _triton_multi_teacher_rows(*args):
    from fastkd.kernels.multi_teacher_rows import multi_teacher_rows

    return multi_teacher_rows(*args)


def _triton_sparse_kd_rows(*args):
    from fastkd.kernels.sparse_rows import sparse_rows

    return sparse_rows(*args)


def _torch_kd_rows(*args):
    from fastkd.rowops import kd_rows_torch

    return kd_rows_torch(*args)


def _torch_sparse_kd_rows(*args):
    from fastkd.rowops import sparse_kd_rows_torch

    return sparse_kd_rows_torch(*args)


def _torch_multi_teacher_rows(*args):
    from fastkd.rowops import multi_teacher_rows_torch

    return multi_teacher_rows_torch(*args)


define_kd_rows("kd_rows_torch", _torch_kd_rows)
define_kd_rows("kd_rows_triton", _triton_kd_rows)
define_multi_teacher_rows("multi_teacher_rows_torch", _torch_multi_teacher_rows)
define_multi_teacher_rows("multi_teacher_rows_triton", _triton_multi_teacher_rows)
define_sparse_kd_rows("sparse_kd_rows_torch", _torch_sparse_kd_rows)
define_sparse_kd_rows("sparse_kd_rows_triton", _triton_sparse_kd_rows)
register_native_fakes()  # when csrc was loaded before this module


# ---- attention

_ATTENTION_OPERANDS = "Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, Tensor? real"
_ATTENTION_OPTIONS = "str loss, bool causal, float scale_s, float scale_t"


def _rows_like(q_s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q_s.new_empty(q_s.shape[:3], dtype=dtype)


@torch.library.custom_op(
    "fastkd::attention_forward_triton", mutates_args=(),
    schema=f"({_ATTENTION_OPERANDS}, {_ATTENTION_OPTIONS}) -> (Tensor, Tensor, Tensor, Tensor)")
def attention_forward_triton(q_s, k_s, q_t, k_t, real, loss, causal, scale_s, scale_t):
    """Row losses, student and teacher row LSEs and (MSE) row deltas, (B, H, L) fp32 each."""
    from fastkd._checks import triton_interpreted
    from fastkd.kernels.attention_loss import attention_mse
    from fastkd.kernels.attention_lse import attention_lse

    common = dict(causal=causal, scale_s=scale_s, scale_t=scale_t, interpreted=triton_interpreted())
    lse_s, lse_t, row_kl = attention_lse(q_s, k_s, q_t, k_t, real, compute_kl=loss == "kl",
                                         **common)
    if loss == "kl":
        return row_kl, lse_s, lse_t, lse_s.new_empty(0)
    row_loss, delta = attention_mse(q_s, k_s, q_t, k_t, real, lse_s, lse_t, **common)
    return row_loss, lse_s, lse_t, delta


@attention_forward_triton.register_fake
def _(q_s, k_s, q_t, k_t, real, loss, causal, scale_s, scale_t):
    rows = _rows_like(q_s, torch.float32)
    delta = q_s.new_empty(0, dtype=torch.float32) if loss == "kl" else torch.empty_like(rows)
    return rows, torch.empty_like(rows), torch.empty_like(rows), delta


@torch.library.custom_op(
    "fastkd::attention_backward_triton", mutates_args=(),
    schema=f"({_ATTENTION_OPERANDS}, Tensor lse_s, Tensor lse_t, Tensor delta, "
           f"Tensor row_weight, {_ATTENTION_OPTIONS}) -> (Tensor, Tensor)")
def attention_backward_triton(q_s, k_s, q_t, k_t, real, lse_s, lse_t, delta, row_weight, loss,
                              causal, scale_s, scale_t):
    """dQ_s (B, H, L, Ds) and dK_s (B, Hs_kv, L, Ds) for row weights (B, H, L) fp32."""
    from fastkd._checks import triton_interpreted
    from fastkd.kernels.attention_backward import attention_backward

    return attention_backward(
        q_s, k_s, q_t, k_t, real, lse_s, lse_t, delta if loss == "mse" else None,
        row_weight.contiguous(), causal=causal, scale_s=scale_s, scale_t=scale_t,
        interpreted=triton_interpreted(),
    )


@attention_backward_triton.register_fake
def _(q_s, k_s, q_t, k_t, real, lse_s, lse_t, delta, row_weight, loss, causal, scale_s,
      scale_t):
    return torch.empty_like(q_s), torch.empty_like(k_s)


@torch.library.custom_op(
    "fastkd::attention_forward_torch", mutates_args=(),
    schema=f"({_ATTENTION_OPERANDS}, {_ATTENTION_OPTIONS}) -> Tensor")
def attention_forward_torch(q_s, k_s, q_t, k_t, real, loss, causal, scale_s, scale_t):
    """Row losses (B, H, L) in q_s's dtype (fp32 or fp64), by blocks of query rows."""
    from fastkd import attention_torch

    row_loss, _ = attention_torch.forward(q_s, k_s, q_t, k_t, real, loss=loss, causal=causal,
                                          scale_s=scale_s, scale_t=scale_t)
    return row_loss


@attention_forward_torch.register_fake
def _(q_s, k_s, q_t, k_t, real, loss, causal, scale_s, scale_t):
    return _rows_like(q_s, q_s.dtype)


@torch.library.custom_op(
    "fastkd::attention_backward_torch", mutates_args=(),
    schema=f"({_ATTENTION_OPERANDS}, Tensor row_weight, {_ATTENTION_OPTIONS}) "
           "-> (Tensor, Tensor)")
def attention_backward_torch(q_s, k_s, q_t, k_t, real, row_weight, loss, causal, scale_s,
                             scale_t):
    """dQ_s, dK_s in the operands' dtype for row weights dL/d(row_loss) (B, H, L)."""
    from fastkd import attention_torch

    return attention_torch.backward(q_s, k_s, q_t, k_t, real, (), row_weight, loss=loss,
                                    causal=causal, scale_s=scale_s, scale_t=scale_t)


@attention_backward_torch.register_fake
def _(q_s, k_s, q_t, k_t, real, row_weight, loss, causal, scale_s, scale_t):
    return torch.empty_like(q_s), torch.empty_like(k_s)


def attention_ops(backend: str) -> tuple[Callable, Callable]:
    """(forward, backward) attention ops of ``backend`` ("triton" or "torch")."""
    namespace = torch.ops.fastkd
    return (getattr(namespace, f"attention_forward_{backend}").default,
            getattr(namespace, f"attention_backward_{backend}").default)


__all__: Sequence[str] = [
    "KD_ROWS_SCHEMA", "MULTI_TEACHER_ROWS_SCHEMA", "SPARSE_KD_ROWS_SCHEMA", "ROW_OPS", "row_op",
    "kd_arguments", "multi_teacher_arguments", "sparse_kd_arguments", "register_fakes",
    "register_native_fakes", "define_kd_rows", "define_multi_teacher_rows",
    "define_sparse_kd_rows", "attention_ops",
]
