"""kd_loss (logits given) against the float64 oracle."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastkd import kd_loss
from fastkd.nn import FusedKDLoss, KDLoss
from fastkd.reference import fused_kd_loss_reference, kd_loss_reference
from tests.helpers import NATIVE_BACKEND, linear_inputs, random_labels, rel_err, tolerance


@pytest.mark.parametrize(
    "divergence,reduction,dtype,backend",
    list(itertools.product(["kl", "reverse_kl", "jsd"], ["mean", "sum", "none"],
                           [torch.float32, torch.bfloat16], ["torch", "triton", NATIVE_BACKEND])),
)
def test_matches_oracle(divergence, reduction, dtype, backend, device):
    gen = torch.Generator().manual_seed(len(divergence) * 7 + len(reduction))
    student = (torch.randn(3, 4, 509, generator=gen) * 12).to(device, dtype).requires_grad_()
    teacher = (torch.randn(3, 4, 509, generator=gen) * 12).to(device, dtype)
    labels = random_labels((3, 4), 509, gen, device)
    options = dict(divergence=divergence, temperature=2.0, beta=0.7, hard_weight=0.5,
                   reduction=reduction)
    loss = kd_loss(student, teacher, labels, backend=backend, **options)
    student64 = student.detach().double().requires_grad_()
    ref = kd_loss_reference(student64, teacher, labels, **options)
    weights = torch.rand(3, 4, generator=gen).to(device) if reduction == "none" else 1.0
    (loss * weights).sum().backward()
    (ref * weights).sum().backward()
    assert loss.shape == ref.shape
    assert rel_err(loss, ref) < tolerance(dtype)
    assert student.grad.dtype == dtype
    assert rel_err(student.grad, student64.grad) < tolerance(dtype)


def test_kd_loss_equals_fused_kd_loss_on_the_same_logits(device):
    gen = torch.Generator().manual_seed(3)
    h_s, w_s, _ = linear_inputs((9,), 16, 300, 8.0, torch.float64, device, gen)
    h_t, w_t, _ = linear_inputs((9,), 16, 300, 8.0, torch.float64, device, gen)
    fused = FusedKDLoss(divergence="jsd", temperature=3.0, backend="torch")(h_s, w_s, h_t, w_t)
    plain = KDLoss(divergence="jsd", temperature=3.0, backend="torch")(h_s @ w_s.T, h_t @ w_t.T)
    reference = fused_kd_loss_reference(h_s, w_s, h_t, w_t, divergence="jsd", temperature=3.0)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(fused, reference)


def test_modules_show_their_options():
    assert "divergence='jsd'" in repr(FusedKDLoss(divergence="jsd"))
    assert "temperature=2.0" in repr(KDLoss(temperature=2.0))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_is_refused(backend, reduction, device):
    """create_graph=True raises, naming the loss, instead of a grad cut from the graph."""
    gen = torch.Generator().manual_seed(32)
    student = (torch.randn(3, 41, generator=gen) * 8).to(device).requires_grad_()
    teacher = (torch.randn(3, 41, generator=gen) * 8).to(device)
    loss = kd_loss(student, teacher, reduction=reduction, backend=backend).sum()
    with pytest.raises(RuntimeError, match="kd_loss does not support double backward"):
        torch.autograd.grad(loss, student, create_graph=True)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("beta,limit", [(0.0, "kl"), (1.0, "reverse_kl")])
def test_jsd_beta_zero_and_one_are_forward_and_reverse_kl(backend, beta, limit, device):
    """beta = 0 is KL(p || q) and beta = 1 is KL(q || p), as in TRL's generalized_jsd_loss and
    Liger-Kernel: the limits of JSD / beta and JSD / (1 - beta) (JSD itself tends to 0)."""
    gen = torch.Generator().manual_seed(37)
    student = (torch.randn(3, 5, 263, generator=gen) * 9).to(device).requires_grad_()
    teacher = (torch.randn(3, 5, 263, generator=gen) * 9).to(device)
    labels = random_labels((3, 5), 263, gen, device)
    options = dict(temperature=1.5, hard_weight=0.2, labels=labels)
    loss = kd_loss(student, teacher, divergence="jsd", beta=beta, backend=backend,
                   **options)
    loss.backward()
    student64 = student.detach().double().requires_grad_()
    ref = kd_loss_reference(student64, teacher, divergence=limit, **options)
    ref.backward()
    assert rel_err(loss, ref) < 1e-5
    assert rel_err(student.grad, student64.grad) < 1e-5

    # the limit, in float64 on the oracle: JSD(beta') / |beta' - beta| -> the KL; it converges
    # where beta' p / q (or the reverse) is small everywhere, so at a modest logit spread
    eps = 1e-9
    near = eps if beta == 0 else 1 - eps
    z_s, z_t = (torch.randn(2, 4, 263, generator=gen, dtype=torch.float64) * 2).unbind()
    jsd = kd_loss_reference(z_s, z_t, divergence="jsd", beta=near)
    kl = kd_loss_reference(z_s, z_t, divergence=limit)
    assert abs(float(jsd / eps / kl) - 1) < 1e-4


def _errors(backend, divergence, beta, temperature, std, seed, shape=(4, 257), teacher=None):
    """(loss, gradient) relative errors of kd_loss against the float64 oracle."""
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(*shape, generator=gen) * std).requires_grad_()
    teacher = torch.randn(*shape, generator=gen) * std if teacher is None else teacher(student)
    options = dict(divergence=divergence, beta=beta, temperature=temperature, reduction="sum")
    loss = kd_loss(student, teacher, backend=backend, **options)
    loss.backward()
    student64 = student.detach().double().requires_grad_()
    ref = kd_loss_reference(student64, teacher, **options)
    ref.backward()
    return rel_err(loss, ref), rel_err(student.grad, student64.grad), student.grad, student64.grad


CASES = [(d, b) for d in ("kl", "reverse_kl") for b in (0.5,)] + [
    ("jsd", b) for b in (1e-7, 1e-3, 0.5, 1 - 1e-7)]


def test_triton_within_1e_5_of_the_oracle_wherever_torch_is():
    """Across T = 1e-3 .. 1e3, beta in (0, 1) and logit std 3 and 30, the Triton row kernel is
    within 1e-5 of the oracle (loss and gradient) wherever the torch backend is (fp32 cannot be
    everywhere: at T = 1e3 both lose the tiny KL of near-uniform rows to cancellation)."""
    checked = 0
    for (divergence, beta), temperature, std in itertools.product(CASES, (1e-3, 1.0, 1e3),
                                                                   (3.0, 30.0)):
        seed = int(1000 * beta) + int(std) + len(divergence)
        torch_errors = _errors("torch", divergence, beta, temperature, std, seed)[:2]
        triton_errors = _errors("triton", divergence, beta, temperature, std, seed)[:2]
        for what, mine, theirs in zip(("loss", "grad"), triton_errors, torch_errors):
            if theirs < 2e-6:  # torch comfortably within 1e-5 (not at the edge of it)
                checked += 1
                assert mine < 1e-5, (divergence, beta, temperature, std, what, mine, theirs)
    assert checked >= 36, checked  # of 72 (42 here): the extremes are covered, not skipped


@pytest.mark.parametrize("std,noise,bound", [(1.0, None, 1e-8), (3.0, 0.01, 2e-7)])
def test_triton_forward_kl_top_logit_gradient_is_direct(std, noise, bound):
    """q - p at the student's top logit is written directly: minus the sum of the rest of the
    row (right for reverse KL and JSD, whose formulas cancel there) carries the rounding of the
    whole row (9e-7 and 7e-7 here, where the torch backend has 1e-9 and 8e-8); a unit-std
    random teacher as in Liger-Kernel's KL tests, and a std-3 teacher close to the student."""
    gen = torch.Generator().manual_seed(6)
    student = torch.randn(4, 4099, generator=gen) * std
    if noise is None:
        teacher = torch.randn(4, 4099, generator=gen) * std
    else:
        teacher = student + noise * torch.randn(4, 4099, generator=gen)
    student.requires_grad_()
    kd_loss(student, teacher, backend="triton", reduction="sum").backward()
    student64 = student.detach().double().requires_grad_()
    kd_loss_reference(student64, teacher, reduction="sum").backward()
    rows, top = torch.arange(4), student.detach().argmax(-1)
    error = (student.grad[rows, top].double() - student64.grad[rows, top]).abs().max()
    assert error < bound, error
