"""return_parts: the loss's unweighted divergence and CE from the same pass, on every backend.

soft and hard are checked against the float64 oracles with (soft_weight, hard_weight) = (1, 0)
and (0, 1), which are the parts by definition; loss = soft_weight * soft + hard_weight * hard;
the gradient of the loss is the one of the call without return_parts, bit for bit (the parts
are detached and the row ops' gradient path does not change).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from fastkd import csrc, fused_kd_loss, kd_loss, multi_teacher_kd_loss, sparse_kd_loss
from fastkd.nn import FusedKDLoss, KDLoss, MultiTeacherKDLoss
from fastkd.reference import (
    fused_kd_loss_reference,
    kd_loss_reference,
    multi_teacher_kd_loss_reference,
    sparse_kd_loss_reference,
)
from tests.helpers import NATIVE_BACKEND, linear_inputs, random_labels, rel_err, tolerance

BACKENDS = ["torch", "triton", NATIVE_BACKEND]
LOSSES = ["fused-kl", "fused-reverse_kl", "fused-jsd", "kd_loss", "multi_teacher", "sparse"]
LEADING, HIDDEN, VOCAB, K = (2, 4), 8, 37, 5  # 8 tokens, chunks of 3 (a ragged last chunk)


@pytest.fixture(scope="module", autouse=True)
def native_ops_loaded():
    assert csrc.load(), "the C++ extension did not build (see the warning)"


@dataclass
class Case:
    """One loss on fixed inputs: ``ours(student, **options)`` and the float64 ``oracle``."""

    student: torch.Tensor  # the differentiable input (hidden states, or logits for kd_loss)
    labels: torch.Tensor | None
    ours: object
    oracle: object


def make_case(loss: str, device: str, labels: bool = True, dtype=torch.float32,
              seed: int = 0) -> Case:
    gen = torch.Generator().manual_seed(seed)
    h_s, w_s, b_s = linear_inputs(LEADING, HIDDEN, VOCAB, 6.0, dtype, device, gen, bias=True)
    h_t, w_t, b_t = linear_inputs(LEADING, 6, VOCAB, 9.0, dtype, device, gen, bias=True)
    y = random_labels(LEADING, VOCAB, gen, device) if labels else None
    if loss.startswith("fused"):
        common = dict(divergence=loss.split("-", 1)[1], beta=0.3)
        return Case(
            h_s, y,
            lambda s, **o: fused_kd_loss(s, w_s, h_t, w_t, y, student_bias=b_s, teacher_bias=b_t,
                                         chunk_size=3, **common, **o),
            lambda **o: fused_kd_loss_reference(h_s, w_s, h_t, w_t, y, student_bias=b_s,
                                                teacher_bias=b_t, **common, **o),
        )
    if loss == "kd_loss":
        z_s, z_t = h_s @ w_s.T + b_s, h_t @ w_t.T + b_t
        return Case(z_s, y, lambda s, **o: kd_loss(s, z_t, y, divergence="reverse_kl", **o),
                    lambda **o: kd_loss_reference(z_s, z_t, y, divergence="reverse_kl", **o))
    if loss == "multi_teacher":
        h_2, w_2, _ = linear_inputs(LEADING, 5, VOCAB, 3.0, dtype, device, gen)
        teachers = ([h_t, h_2], [w_t, w_2])
        common = dict(teacher_priors=[0.7, 0.3], fusion="mixture")
        return Case(
            h_s, y,
            lambda s, **o: multi_teacher_kd_loss(s, w_s, *teachers, y, student_bias=b_s,
                                                 chunk_size=3, **common, **o),
            lambda **o: multi_teacher_kd_loss_reference(h_s, w_s, *teachers, y,
                                                        student_bias=b_s, **common, **o),
        )
    z_t = (h_t.double() @ w_t.double().T + b_t.double())
    top = z_t.topk(K, dim=-1)
    ids, logits = top.indices, top.values.to(dtype)

    def sparse_lse(temperature):
        return torch.logsumexp(z_t / temperature, dim=-1).to(dtype)

    return Case(
        h_s, y,
        lambda s, temperature=1.0, **o: sparse_kd_loss(
            s, w_s, ids, logits, sparse_lse(temperature), y, student_bias=b_s,
            divergence="reverse_kl", temperature=temperature, chunk_size=3, **o),
        lambda temperature=1.0, **o: sparse_kd_loss_reference(
            h_s, w_s, ids, logits, sparse_lse(temperature), y, student_bias=b_s,
            divergence="reverse_kl", temperature=temperature, **o),
    )


def run(case: Case, reduction: str, **options):
    """The output and the student gradient of ``case`` (a per-token weighted sum for "none")."""
    student = case.student.clone().requires_grad_()
    out = case.ours(student, reduction=reduction, **options)
    loss = out[0] if options.get("return_parts") else out
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (loss * weights.to(loss.device)).sum().backward()
    return out, student.grad


def check_parts(case: Case, reduction: str, backend: str, **weights):
    """soft / hard against the oracle, the loss as their weighted sum, an unchanged gradient."""
    options = dict(temperature=2.0, backend=backend, **weights)
    (loss, soft, hard), grad = run(case, reduction, return_parts=True, **options)
    plain, plain_grad = run(case, reduction, **options)
    ref = dict(temperature=2.0, reduction=reduction)
    soft_ref = case.oracle(soft_weight=1.0, hard_weight=0.0, **ref)
    hard_ref = case.oracle(soft_weight=0.0, hard_weight=1.0, **ref)
    tol = tolerance(case.student.dtype)
    assert soft.shape == hard.shape == loss.shape == soft_ref.shape
    assert soft.dtype == hard.dtype == loss.dtype
    assert not soft.requires_grad and not hard.requires_grad  # detached
    assert rel_err(soft, soft_ref) < tol
    assert rel_err(hard, hard_ref) < tol
    combined = weights["soft_weight"] * soft + weights["hard_weight"] * hard
    assert rel_err(loss, combined) < 1e-6  # one pass: rounding apart
    assert torch.equal(loss, plain)
    assert torch.equal(grad, plain_grad)
    return soft, hard


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_parts_match_the_oracle(backend, loss, reduction, device):
    """With ignored tokens (about a quarter): the parts are 0 there and count like the loss."""
    case = make_case(loss, device)
    soft, hard = check_parts(case, reduction, backend, soft_weight=0.7, hard_weight=0.4)
    if reduction == "none":
        ignored = case.labels == -100
        assert ignored.any() and not ignored.all()
        assert not soft[ignored].any() and not hard[ignored].any()
        assert (soft[~ignored] > 0).all() and (hard[~ignored] > 0).all()


@pytest.mark.parametrize("weights", [dict(soft_weight=0.0, hard_weight=1.0),
                                     dict(soft_weight=1.3, hard_weight=0.0)])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_zero_weight_still_gets_its_part(backend, loss, weights, device):
    """soft_weight = 0 still returns the divergence, hard_weight = 0 (with labels) the CE."""
    soft, hard = check_parts(make_case(loss, device), "mean", backend, **weights)
    assert soft > 0 and hard > 0


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_without_labels_hard_is_zero(backend, loss, device):
    case = make_case(loss, device, labels=False)
    (loss_none, soft, hard), _ = run(case, "none", return_parts=True, temperature=2.0,
                                     backend=backend)
    assert torch.equal(hard, torch.zeros_like(loss_none))
    soft_ref = case.oracle(temperature=2.0, reduction="none")
    assert rel_err(soft, soft_ref) < tolerance(torch.float32)
    assert torch.equal(loss_none, soft)  # soft_weight = 1, hard_weight = 0
    (loss_mean, soft_mean, hard_mean), _ = run(case, "mean", return_parts=True, backend=backend)
    assert hard_mean.item() == 0.0 and soft_mean.shape == ()


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_parts_are_float64(backend, device):
    case = make_case("fused-jsd", device, dtype=torch.float64)
    (loss, soft, hard), _ = run(case, "sum", return_parts=True, backend=backend,
                                soft_weight=0.5, hard_weight=0.5)
    assert soft.dtype == hard.dtype == torch.float64
    # the torch and C++ backends compute in float64: the parts are float64-accurate there
    tol = 1e-12 if backend != "triton" else tolerance(torch.float32)
    assert rel_err(soft, case.oracle(soft_weight=1.0, hard_weight=0.0, reduction="sum")) < tol
    assert rel_err(hard, case.oracle(soft_weight=0.0, hard_weight=1.0, reduction="sum")) < tol


def test_multi_teacher_parts_come_before_the_mixing_weights(device):
    case = make_case("multi_teacher", device)
    plain_loss, mixing = case.ours(case.student, backend="torch", return_mixing=True)
    loss, soft, hard, w = case.ours(case.student, backend="torch", return_mixing=True,
                                    return_parts=True)
    assert torch.equal(loss, plain_loss) and torch.equal(w, mixing)
    assert w.shape == (*LEADING, 2) and soft.shape == hard.shape == ()


def test_modules_take_return_parts(device):
    gen = torch.Generator().manual_seed(3)
    h_s, w_s, _ = linear_inputs((5,), 8, 20, 3.0, torch.float32, device, gen)
    h_t, w_t, _ = linear_inputs((5,), 6, 20, 3.0, torch.float32, device, gen)
    y = random_labels((5,), 20, gen, device)
    options = dict(hard_weight=0.5, backend="torch")
    fused = FusedKDLoss(return_parts=True, **options)(h_s, w_s, h_t, w_t, y)
    z_s, z_t = h_s @ w_s.T, h_t @ w_t.T
    logits = KDLoss(return_parts=True, **options)(z_s, z_t, y)
    multi = MultiTeacherKDLoss(return_parts=True, **options)(h_s, w_s, [h_t], [w_t], y)
    expected = fused_kd_loss(h_s, w_s, h_t, w_t, y, return_parts=True, **options)
    for out in (fused, logits, multi):
        assert len(out) == 3
        torch.testing.assert_close(torch.stack(out), torch.stack(expected), rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("value", [1, 0, "yes", None, torch.tensor(True)])
@pytest.mark.parametrize("loss", ["fused-kl", "kd_loss", "multi_teacher", "sparse"])
def test_return_parts_must_be_a_bool(loss, value):
    case = make_case(loss, "cpu")
    with pytest.raises(TypeError, match="return_parts must be a bool"):
        case.ours(case.student, backend="torch", return_parts=value)


@pytest.mark.parametrize("loss", ["fused-kl", "kd_loss", "multi_teacher", "sparse"])
def test_labels_are_range_checked_for_the_parts(loss):
    """hard_weight = 0 reads no label, but the parts' CE does: a label outside [0, V) is an
    error then, as with hard_weight > 0."""
    case = make_case(loss, "cpu")
    bad = torch.full(LEADING, VOCAB)
    student = case.student
    if loss == "kd_loss":
        call = lambda: kd_loss(student, student.detach() * 2, bad, return_parts=True)  # noqa: E731
    elif loss == "fused-kl":
        w = torch.zeros(VOCAB, HIDDEN)
        call = lambda: fused_kd_loss(student, w, student, w, bad, return_parts=True)  # noqa: E731
    elif loss == "multi_teacher":
        w = torch.zeros(VOCAB, HIDDEN)
        call = lambda: multi_teacher_kd_loss(student, w, [student], [w], bad,  # noqa: E731
                                             return_parts=True)
    else:
        w = torch.zeros(VOCAB, HIDDEN)
        ids = torch.zeros(*LEADING, 1, dtype=torch.int64)
        call = lambda: sparse_kd_loss(student, w, ids, torch.zeros(*LEADING, 1),  # noqa: E731
                                      torch.zeros(LEADING), bad, return_parts=True)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 37\)"):
        call()
