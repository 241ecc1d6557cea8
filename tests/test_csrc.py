"""The C++ row ops (csrc/): the build, its cache and switches, and each op against the oracle.

The public losses' oracle grids (test_fused_kd_loss.py, test_kd_loss.py,
test_multi_teacher_kd_loss.py) run on the native backend too; these tests reach the ops
directly, at the extremes of temperature and beta, and the build's failure modes.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastkd import csrc, fused_kd_loss
from fastkd._checks import resolve_backend
from fastkd.reference import kd_loss_reference, multi_teacher_kd_loss_reference
from tests.helpers import rel_err

ROOT = Path(__file__).resolve().parent.parent
cpu = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def built():
    assert csrc.load(), "the C++ extension did not build (see the warning)"


def logits(shape, std, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)


def labels_with_ignored(rows, vocab, seed, dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[::3] = -100
    return labels.to(dtype)


def kd_oracle(z, zt, labels, **options):
    """Per-token loss and d loss_i / d z_s in float64."""
    z64 = z.detach().double().requires_grad_()
    loss = kd_loss_reference(z64, zt.double(), labels, reduction="none", **options)
    loss.sum().backward()
    return loss.detach(), z64.grad


# The ops' logit transforms, none: kd_rows' student softcap and scale, then the teacher's;
# multi_teacher_rows' student pair, then the (empty) per-teacher lists.
NO_TRANSFORMS = (0.0, 1.0, 0.0, 1.0)
NO_MULTI_TEACHER_TRANSFORMS = (0.0, 1.0, [], [])


def tolerance(dtype):
    return 1e-12 if dtype == torch.float64 else 1e-5


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "tvd", "skew_kl",
                                        "skew_reverse_kl"])
@pytest.mark.parametrize("temperature", [1e-3, 1.0, 2.5, 1e3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("std", [3.0, 30.0])
def test_kd_rows_matches_oracle(divergence, temperature, dtype, std):
    rows, vocab = 7, 1031  # prime: no multiple of any vector width
    z, zt = logits((rows, vocab), std, dtype, 1), logits((rows, vocab), std, dtype, 2)
    labels = labels_with_ignored(rows, vocab, 3)
    options = dict(divergence=divergence, beta=0.3, alpha=0.6, temperature=temperature,
                   soft_weight=0.7, hard_weight=0.4)
    ref_loss, ref_grad = kd_oracle(z, zt, labels, **options)
    grad = torch.empty_like(z)
    loss = torch.ops.fastkd.kd_rows(z, zt, labels, grad, divergence, 0.3, temperature, 0.7, 0.4,
                                    -100, 0.6, *NO_TRANSFORMS)
    assert loss.dtype == dtype
    assert rel_err(loss, ref_loss) < tolerance(dtype)
    assert rel_err(grad, ref_grad) < tolerance(dtype)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "tvd", "skew_kl",
                                        "skew_reverse_kl"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("masked_start", [False, True])
def test_kd_rows_across_vocab_blocks(divergence, temperature, masked_start):
    """V = 5003 spans three of the first pass's 2,048-element blocks; logits trending upward
    raise the running maxima in every block (the sums are rescaled each time), and a first
    block of -inf (a masked vocab range) leaves nothing to rescale."""
    rows, vocab = 5, 5003
    trend = torch.linspace(0, 40, vocab, dtype=torch.float64)
    z = (logits((rows, vocab), 6.0, torch.float64, 19) + trend).float()
    zt = (logits((rows, vocab), 6.0, torch.float64, 20) + trend.flip(0) * 0.5 + trend).float()
    if masked_start:
        z[:, :2048] = float("-inf") if "reverse_kl" in divergence else z[:, :2048]
        zt[:, :2048] = float("-inf")
    labels = labels_with_ignored(rows, vocab, 21)
    labels[labels >= 0] = vocab - 1 - labels[labels >= 0] % 100  # finite student logits
    options = dict(divergence=divergence, beta=0.4, alpha=0.8, temperature=temperature,
                   hard_weight=0.4)
    # the oracle's 0 * log 0 at -inf logits is NaN: give it -1e4 there (exp underflows to 0)
    finite = lambda t: t.double().clamp(min=-1e4)  # noqa: E731
    ref_loss, ref_grad = kd_oracle(finite(z), finite(zt), labels, **options)
    grad = torch.empty_like(z)
    loss = torch.ops.fastkd.kd_rows(z, zt, labels, grad, divergence, 0.4, temperature, 1.0, 0.4,
                                    -100, 0.8, *NO_TRANSFORMS)
    assert rel_err(loss, ref_loss) < 1e-5
    assert rel_err(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("beta", [1e-7, 0.5, 1 - 1e-7])
def test_jsd_at_extreme_beta(beta):
    z, zt = logits((5, 389), 10.0, torch.float32, 4), logits((5, 389), 10.0, torch.float32, 5)
    ref_loss, ref_grad = kd_oracle(z, zt, None, divergence="jsd", beta=beta)
    grad = torch.empty_like(z)
    loss = torch.ops.fastkd.kd_rows(z, zt, None, grad, "jsd", beta, 1.0, 1.0, 0.0, -100, 0.9,
                                    *NO_TRANSFORMS)
    assert rel_err(loss, ref_loss) < 1e-5
    assert rel_err(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
def test_half_gradient_output(grad_dtype):
    """The gradient is written in half precision: off by its rounding (2^-8 relative) only."""
    z, zt = logits((6, 777), 8.0, torch.float32, 6), logits((6, 777), 8.0, torch.float32, 7)
    _, ref_grad = kd_oracle(z, zt, None, divergence="reverse_kl")
    grad = torch.empty(6, 777, dtype=grad_dtype)
    torch.ops.fastkd.kd_rows(z, zt, None, grad, "reverse_kl", 0.5, 1.0, 1.0, 0.0, -100, 0.9,
                             *NO_TRANSFORMS)
    assert rel_err(grad, ref_grad) < 2**-8


@pytest.mark.parametrize("divergence", ["kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gradient_in_place_of_the_logits_and_int32_labels(divergence, temperature):
    """grad_out is student_logits (the fp32 chunk path); kl at T = 1 keeps pass 1's exps in
    the gradient row, which then holds the logits no more."""
    z, zt = logits((9, 4099), 12.0, torch.float32, 8), logits((9, 4099), 12.0, torch.float32, 9)
    labels = labels_with_ignored(9, 4099, 10)
    ref_loss, ref_grad = kd_oracle(z, zt, labels, divergence=divergence, hard_weight=0.5,
                                   temperature=temperature)
    in_place = z.clone()
    loss = torch.ops.fastkd.kd_rows(in_place, zt, labels.int(), in_place, divergence, 0.5,
                                    temperature, 1.0, 0.5, -100, 0.9, *NO_TRANSFORMS)
    assert rel_err(loss, ref_loss) < 1e-5
    assert rel_err(in_place, ref_grad) < 1e-5


def test_ignored_rows_are_zero_even_when_not_finite():
    z, zt = logits((4, 300), 5.0, torch.float32, 11), logits((4, 300), 5.0, torch.float32, 12)
    z[1] = float("nan")
    zt[2] = float("inf")
    labels = torch.tensor([3, -100, -100, 7])
    grad = torch.full_like(z, 123.0)
    loss = torch.ops.fastkd.kd_rows(z, zt, labels, grad, "kl", 0.5, 1.0, 1.0, 0.3, -100, 0.9,
                                    *NO_TRANSFORMS)
    assert loss[1] == 0 and loss[2] == 0 and torch.isfinite(loss).all()
    assert (grad[1:3] == 0).all() and torch.isfinite(grad).all()
    z[0, 5] = float("nan")  # a counted row with NaN gives a NaN loss, never a finite one
    loss = torch.ops.fastkd.kd_rows(z, zt, labels, None, "kl", 0.5, 1.0, 1.0, 0.3, -100, 0.9,
                                    *NO_TRANSFORMS)
    assert torch.isnan(loss[0])


@pytest.mark.parametrize("fusion", ["mixture", "weighted_kl"])
@pytest.mark.parametrize("weighting", ["entropy", "static"])
@pytest.mark.parametrize("temperature", [1e-3, 1.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multi_teacher_rows_matches_oracle(fusion, weighting, temperature, dtype):
    rows, vocab, teachers = 6, 257, 3
    z = logits((rows, vocab), 10.0, dtype, 13)
    zt = logits((teachers, rows, vocab), 10.0, dtype, 14)
    labels = labels_with_ignored(rows, vocab, 15)
    priors = [0.2, 0.3, 0.5]
    # the oracle takes hidden states and weights: logits = z @ I
    eye = torch.eye(vocab, dtype=torch.float64)
    z64 = z.double().requires_grad_()
    ref, ref_w = multi_teacher_kd_loss_reference(
        z64, eye, list(zt.double()), [eye] * teachers, labels, temperature=temperature,
        weighting=weighting, teacher_priors=priors, fusion=fusion, soft_weight=0.8,
        hard_weight=0.3, reduction="none", return_mixing=True)
    ref.sum().backward()
    grad, weights = torch.empty_like(z), torch.empty(rows, teachers)
    loss = torch.ops.fastkd.multi_teacher_rows(z, zt, labels, grad, weights, priors, temperature,
                                               weighting, 1.0, fusion, 0.8, 0.3, -100,
                                               *NO_MULTI_TEACHER_TRANSFORMS)
    assert rel_err(loss, ref) < tolerance(dtype)
    assert rel_err(grad, z64.grad) < tolerance(dtype)
    assert rel_err(weights, ref_w) < 1e-6  # written as fp32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
def test_addmm_fp32_accumulates_half_operands_in_fp32(dtype, transposed):
    gen = torch.Generator().manual_seed(16)
    a = torch.randn(37, 129, generator=gen).to(dtype)
    b = torch.randn(300, 129, generator=gen).to(dtype).T if transposed else \
        torch.randn(129, 300, generator=gen).to(dtype)
    out = torch.randn(37, 300, generator=gen)
    expected = out.double() + a.double() @ b.double()
    torch.ops.fastkd.addmm_fp32(out, a, b, 1.0)
    # The products of half values are exact in fp32; summing K = 129 of them in fp32 (in any
    # order, any vector width) is off by at most about K fp32 epsilons, far below the 2^-8 a
    # bf16 output would round to.
    bound = 129 * 2**-24
    assert rel_err(out, expected) < bound
    torch.ops.fastkd.addmm_fp32(out, a, b, 0.0)
    assert rel_err(out, a.double() @ b.double()) < bound


def test_addmm_fp32_opcheck():
    gen = torch.Generator().manual_seed(18)
    a = torch.randn(19, 33, generator=gen).bfloat16()
    b = torch.randn(45, 33, generator=gen).bfloat16().T
    torch.library.opcheck(torch.ops.fastkd.addmm_fp32.default, (torch.zeros(19, 45), a, b, 1.0))


def test_auto_backend_is_the_extension_on_cpu():
    assert resolve_backend("auto", cpu, native=True) == "cpp"
    assert resolve_backend("auto", cpu) == "torch"  # the attention loss has no C++ kernels
    with pytest.raises(ValueError, match="backend='cpp' has no kernels for this loss"):
        resolve_backend("cpp", cpu)
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        resolve_backend("cuda", cpu, native=True)


def test_build_folder_is_keyed_by_torch_and_cpu_level():
    folder = csrc.build_directory().name
    assert torch.__version__.replace("+", "-") in folder
    assert folder.endswith(csrc.cpu_capability())


def run_python(code: str, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout, env={**os.environ, **env})


LOSS_OF_A_FIXED_BATCH = """
    import warnings
    import torch
    from fastkd import fused_kd_loss
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(33, 16, generator=gen), torch.randn(515, 16, generator=gen) * 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = fused_kd_loss(h, w, h.flip(0), w.flip(0), divergence="jsd")
    from fastkd._checks import resolve_backend
    print(resolve_backend("auto", torch.device("cpu"), native=True), repr(loss.item()),
          sum("C++ row ops did not build" in str(w.message) for w in caught))
"""


def test_another_cpu_level_builds_its_own_binary_with_the_same_results(tmp_path):
    """ATEN_CPU_CAPABILITY=default (a CPU without AVX2) gets a scalar build in its own folder,
    created on the way (nested and missing), and the same loss to fp32 precision."""
    here = run_python(LOSS_OF_A_FIXED_BATCH)
    cache = tmp_path / "missing" / "nested"
    other = run_python(LOSS_OF_A_FIXED_BATCH, ATEN_CPU_CAPABILITY="default",
                       FASTKD_CSRC_CACHE=str(cache), FASTKD_CSRC="1")
    assert here.returncode == 0 and other.returncode == 0, here.stderr[-2000:] + other.stderr[-2000:]
    backend, loss_here, warned = here.stdout.split()
    backend_other, loss_other, _ = other.stdout.split()
    assert backend == backend_other == "cpp" and warned == "0"
    assert abs(float(loss_here) - float(loss_other)) <= 1e-5 * abs(float(loss_here))
    assert [p.name for p in cache.iterdir()] == [
        f"torch{torch.__version__.replace('+', '-')}-DEFAULT"]


def test_a_stale_lock_from_a_killed_build_does_not_hang_the_next_load():
    lock = csrc.build_directory() / "lock"
    lock.touch()
    done = run_python(LOSS_OF_A_FIXED_BATCH, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not lock.exists()


def test_a_failed_build_warns_once_and_falls_back_to_torch(tmp_path):
    broken = dict(CXX="false", FASTKD_CSRC_CACHE=str(tmp_path))
    done = run_python(LOSS_OF_A_FIXED_BATCH, **broken)
    assert done.returncode == 0, done.stderr[-2000:]
    backend, _, warned = done.stdout.split()
    assert backend == "torch" and warned == "1"
    required = run_python(LOSS_OF_A_FIXED_BATCH, FASTKD_CSRC="1", **broken)
    assert required.returncode != 0
    assert "building the C++ row ops failed" in required.stderr


def test_fastkd_csrc_0_turns_the_extension_off():
    done = run_python(LOSS_OF_A_FIXED_BATCH, FASTKD_CSRC="0")
    assert done.returncode == 0, done.stderr[-2000:]
    backend, _, warned = done.stdout.split()
    assert backend == "torch" and warned == "0"


def test_fused_loss_on_the_extension_equals_the_torch_backend():
    gen = torch.Generator().manual_seed(17)
    h, w = torch.randn(40, 24, generator=gen), torch.randn(611, 24, generator=gen) * 2
    ht, wt = torch.randn(40, 32, generator=gen), torch.randn(611, 32, generator=gen) * 2
    out = {b: fused_kd_loss(h, w, ht, wt, divergence="reverse_kl", backend=b)
           for b in ("cpp", "torch")}
    assert rel_err(out["cpp"], out["torch"]) < 1e-5


def nvcc() -> Path:
    """nvcc 13.0 from the PyPI wheels of the dev extra, or a CUDA toolkit's (a GPU machine)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is not None:
        for root in spec.submodule_search_locations:
            if (Path(root) / "cu13" / "bin" / "nvcc").exists():
                return Path(root) / "cu13" / "bin" / "nvcc"
    found = shutil.which("nvcc")
    assert found, "no nvcc: the nvidia-cuda-nvcc wheels are not installed (make setup does)"
    return Path(found)


def test_cuda_kernels_compile_for_sm90_without_spills(tmp_path):
    """The torch-free kernel part of rows_cuda.cu compiles to an sm_90 cubin, register spills
    being errors (the CUDA torch builds the whole file on a GPU machine)."""
    compiler = nvcc()
    include = compiler.parent.parent / "include"  # the wheels' CUDA headers (a toolkit's too)
    done = subprocess.run(
        [str(compiler), "-cubin", "-arch=sm_90", "-O3", "-std=c++17", "-DFASTKD_KERNELS_ONLY",
         f"-I{include}", "-Xptxas", "--warn-on-spills,--warning-as-error",
         "-o", str(tmp_path / "rows.cubin"), str(ROOT / "csrc" / "rows_cuda.cu")],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "rows.cubin").stat().st_size > 0
