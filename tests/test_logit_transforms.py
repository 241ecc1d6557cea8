"""Soft-capped and scaled logits (Gemma 2 / 3, Granite, Cohere) inside the row ops, on every
backend, against the float64 oracle that applies f(z) = c tanh(a z / c) to materialized logits.

Logits far past the cap (std 100 to 300 against caps 30 and 50: |a z / c| up to ~20) are the
point: there tanh saturates, sech^2 is ~1e-17, and 1 - tanh^2 would be 0 in fp32.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastkd import fused_kd_loss, kd_loss, multi_teacher_kd_loss, sparse_kd_loss
from fastkd.nn import FusedKDLoss, KDLoss
from fastkd.reference import (
    kd_loss_reference,
    model_logits,
    multi_teacher_kd_loss_reference,
    sparse_kd_loss_reference,
)
from tests.helpers import NATIVE_BACKEND, linear_inputs, random_labels, rel_err, tolerance
from tests.test_fused_kd_loss import run_both

BACKENDS = ["torch", "triton", NATIVE_BACKEND]
# (student_softcap, student_logit_scale, teacher_softcap, teacher_logit_scale): student only,
# teacher only, both, scales alone (Granite 1 / 8, Cohere 0.0625), Gemma-like caps
TRANSFORMS = [
    dict(student_softcap=30.0),
    dict(teacher_softcap=50.0, teacher_logit_scale=0.125),
    dict(student_softcap=50.0, student_logit_scale=0.5, teacher_softcap=30.0),
    dict(student_logit_scale=0.125, teacher_logit_scale=0.0625),
    dict(student_softcap=30.0, student_logit_scale=0.0625, teacher_softcap=30.0,
         teacher_logit_scale=0.5),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_matches_oracle(backend, divergence, dtype, device):
    """Loss and the gradients of hidden, weight and bias, each transform, T in {1, 2.5}, hard CE
    with ignored tokens, reductions mean and none, logits well past the cap."""
    tol = tolerance(dtype)
    cases = list(enumerate(TRANSFORMS))
    for case, transform in cases if dtype == torch.float32 else cases[::2]:  # T, reduction alternate
        temperature, reduction = [(1.0, "mean"), (2.5, "none")][(case + len(divergence)) % 2]
        loss, ref, ours, refs = run_both(
            (2, 3), 16, 24, 131, dtype, device, 7 * case + len(divergence), bias=True,
            divergence=divergence, temperature=temperature, beta=0.3, soft_weight=0.7,
            hard_weight=0.4, reduction=reduction, backend=backend, chunk_size=4,
            logit_std=[100.0, 300.0][case % 2], **transform)
        where = f"{transform} T={temperature} {reduction}"
        assert loss.shape == ref.shape, where
        assert rel_err(loss, ref) < tol, where
        for mine, theirs in zip(ours, refs):
            assert rel_err(mine.grad, theirs.grad) < tol, where


def _far_logits(rows: int, vocab: int, cap: float, seed: int) -> torch.Tensor:
    """Raw logits spread over [-10 c, 10 c], a few exactly at +-10 c."""
    gen = torch.Generator().manual_seed(seed)
    z = (torch.rand(rows, vocab, generator=gen) * 2 - 1) * 10 * cap
    z[:, :2] = torch.tensor([-10 * cap, 10 * cap])
    return z


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_far_past_the_cap_every_gradient_entry(backend, temperature, device):
    """Entry by entry, the hard CE's gradient (softmax(f(z)) - onehot) f'(z) with |z| up to
    10 c: f'(z) = sech^2(z / c) down to 8e-9 at |z| = 10 c (1 - tanh^2 would give 0 in fp32
    there) is resolved to fp32's precision. z / c carries a relative error of 2^-24, so
    e^{-2|x|} one of 2|x| 2^-24 <= 1.2e-6, and softmax(f) one of |f - max f| 2^-24 <= 4e-6."""
    cap, rows, vocab = 30.0, 4, 97
    z_s = _far_logits(rows, vocab, cap, 1).to(device)
    z_t = _far_logits(rows, vocab, cap, 2).to(device)
    labels = torch.tensor([0, 1, 5, -100], device=device)
    options = dict(soft_weight=0.0, hard_weight=1.0, temperature=temperature,
                   student_softcap=cap, teacher_softcap=cap)
    student = z_s.clone().requires_grad_()
    loss = kd_loss(student, z_t, labels, backend=backend, **options)
    loss.backward()
    z64 = z_s.double().requires_grad_()
    ref = kd_loss_reference(z64, z_t.double(), labels, **options)
    ref.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    grad, want = student.grad.double(), z64.grad
    resolvable = want.abs() > 1e-30  # within fp32's range with room for its rounding
    assert resolvable[0, 0] and resolvable[1, 1]  # the labels at -10 c and +10 c
    error = (grad - want).abs()[resolvable] / want.abs()[resolvable]
    assert error.max() < 2e-5, f"worst relative error {error.max():.3g}"
    assert (grad[3] == 0).all()  # the ignored token


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_cap_equals_no_cap(backend, device):
    """A cap far above every logit changes nothing: f(z) = z to within rounding (exactly, below
    |z / c| = 2^-12, where f(z) = a z is used)."""
    gen = torch.Generator().manual_seed(3)
    z_s = (torch.randn(5, 77, generator=gen) * 20).to(device)
    z_t = (torch.randn(5, 77, generator=gen) * 20).to(device)
    labels = random_labels((5,), 77, gen, device)
    results = []
    for caps in [dict(), dict(student_softcap=1e30, teacher_softcap=1e30),
                 dict(student_softcap=1e300, teacher_softcap=1e300)]:
        student = z_s.clone().requires_grad_()
        loss = kd_loss(student, z_t, labels, divergence="reverse_kl", hard_weight=0.5,
                       backend=backend, reduction="none", **caps)
        loss.sum().backward()
        results.append((loss.detach(), student.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fusion", ["mixture", "weighted_kl"])
def test_multi_teacher_with_a_transform_per_teacher(backend, fusion, device):
    """Three teachers: Gemma-like (cap 30), Granite-like (scale 1 / 8), Cohere-like (scale
    0.0625 under cap 50); a capped student; mixing weights, loss and student gradients."""
    gen = torch.Generator().manual_seed(5)
    leading, hidden, vocab = (2, 3), 16, 113
    h_s, w_s, b_s = linear_inputs(leading, hidden, vocab, 200.0, torch.float32, device, gen,
                                  bias=True)
    teachers = [linear_inputs(leading, 12 + 4 * k, vocab, 200.0, torch.float32, device, gen)
                for k in range(3)]
    labels = random_labels(leading, vocab, gen, device)
    options = dict(fusion=fusion, temperature=2.5, hard_weight=0.3, student_softcap=30.0,
                   teacher_softcap=[30.0, None, 50.0], teacher_logit_scale=[1.0, 0.125, 0.0625])
    ours = [t.clone().requires_grad_() for t in (h_s, w_s, b_s)]
    refs = [t.clone().double().requires_grad_() for t in (h_s, w_s, b_s)]
    loss, mixing = multi_teacher_kd_loss(
        ours[0], ours[1], [t[0] for t in teachers], [t[1] for t in teachers], labels,
        student_bias=ours[2], backend=backend, chunk_size=4, return_mixing=True, **options)
    ref, ref_mixing = multi_teacher_kd_loss_reference(
        refs[0], refs[1], [t[0] for t in teachers], [t[1] for t in teachers], labels,
        student_bias=refs[2], return_mixing=True, **options)
    loss.backward()
    ref.backward()
    assert rel_err(loss, ref) < 1e-4
    assert rel_err(mixing, ref_mixing) < 1e-4
    for mine, theirs in zip(ours, refs):
        assert rel_err(mine.grad, theirs.grad) < 1e-4
    # one value for every teacher equals that value repeated
    same = dict(options, teacher_softcap=40.0, teacher_logit_scale=0.5)
    repeated = dict(options, teacher_softcap=[40.0] * 3, teacher_logit_scale=[0.5] * 3)
    one, many = (multi_teacher_kd_loss(h_s, w_s, [t[0] for t in teachers],
                                       [t[1] for t in teachers], labels, backend=backend, **o)
                 for o in (same, repeated))
    assert one.item() == many.item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
def test_sparse_with_a_student_cap(backend, tail, divergence, device):
    """A capped, scaled student against a stored top-k teacher (its emitted, capped logits)."""
    gen = torch.Generator().manual_seed(9)
    leading, hidden, vocab, k = (2, 3), 16, 101, 12
    h_s, w_s, _ = linear_inputs(leading, hidden, vocab, 200.0, torch.float32, device, gen)
    emitted = 30.0 * torch.tanh(torch.randn(*leading, vocab, generator=gen) * 3).to(device)
    labels = random_labels(leading, vocab, gen, device)
    for temperature in [1.0, 2.5]:
        ids = emitted.topk(k, dim=-1).indices
        logits = emitted.gather(-1, ids)
        lse = torch.logsumexp(emitted / temperature, dim=-1)
        options = dict(tail=tail, divergence=divergence, temperature=temperature,
                       hard_weight=0.4, student_softcap=30.0, student_logit_scale=0.5)
        ours = [t.clone().requires_grad_() for t in (h_s, w_s)]
        refs = [t.clone().double().requires_grad_() for t in (h_s, w_s)]
        loss = sparse_kd_loss(ours[0], ours[1], ids, logits, lse, labels, backend=backend,
                              chunk_size=4, **options)
        ref = sparse_kd_loss_reference(refs[0], refs[1], ids, logits, lse, labels, **options)
        loss.backward()
        ref.backward()
        assert rel_err(loss, ref) < 1e-4, temperature
        for mine, theirs in zip(ours, refs):
            assert rel_err(mine.grad, theirs.grad) < 1e-4, temperature


@pytest.mark.parametrize("backend,divergence", [("torch", "jsd"), (NATIVE_BACKEND, "reverse_kl")])
def test_gradcheck_float64(backend, divergence, device):
    """float64 end to end through a capped student and teacher: torch.autograd.gradcheck of the
    hidden states, weight and bias (the chain rule through f, the top entry's rewrite)."""
    gen = torch.Generator().manual_seed(17)
    h, w, b = linear_inputs((3,), 3, 13, 8.0, torch.float64, device, gen, True)
    h_t, w_t, _ = linear_inputs((3,), 5, 13, 8.0, torch.float64, device, gen)
    labels = random_labels((3,), 13, gen, device)

    def fn(h, w, b):
        return fused_kd_loss(h, w, h_t, w_t, labels, student_bias=b, divergence=divergence,
                             temperature=1.5, hard_weight=0.3, reduction="none", backend=backend,
                             chunk_size=2, student_softcap=3.0, student_logit_scale=0.5,
                             teacher_softcap=2.0)

    assert torch.autograd.gradcheck(fn, [t.requires_grad_() for t in (h, w, b)])


def test_modules_take_the_transform_options():
    gen = torch.Generator().manual_seed(13)
    h_s, w_s, _ = linear_inputs((6,), 8, 53, 100.0, torch.float32, "cpu", gen)
    h_t, w_t, _ = linear_inputs((6,), 8, 53, 100.0, torch.float32, "cpu", gen)
    options = dict(student_softcap=30.0, teacher_logit_scale=0.125, backend="torch")
    module = FusedKDLoss(**options)
    assert "student_softcap=30.0" in repr(module)
    assert module(h_s, w_s, h_t, w_t).item() == fused_kd_loss(h_s, w_s, h_t, w_t,
                                                             **options).item()
    z_s, z_t = h_s @ w_s.T, h_t @ w_t.T
    assert KDLoss(**options)(z_s, z_t).item() == kd_loss(z_s, z_t, **options).item()
    expected = kd_loss_reference(z_s, z_t, student_softcap=30.0, teacher_logit_scale=0.125)
    assert rel_err(KDLoss(**options)(z_s, z_t), expected) < 1e-5


def test_reference_transform_is_scale_then_cap():
    z = torch.tensor([-400.0, -3.0, 0.0, 2.0, 400.0], dtype=torch.float64)
    assert torch.equal(model_logits(z, None, 0.5), 0.5 * z)
    torch.testing.assert_close(model_logits(z, 30.0, 0.0625), 30.0 * torch.tanh(0.0625 * z / 30))


BAD_VALUES = [(0.0, ValueError), (-1.0, ValueError), (math.nan, ValueError),
              (math.inf, ValueError), (True, TypeError), ("30", TypeError),
              (torch.tensor(30.0), TypeError)]


@pytest.mark.parametrize("name", ["student_softcap", "teacher_softcap", "student_logit_scale",
                                  "teacher_logit_scale"])
@pytest.mark.parametrize("value,error", BAD_VALUES)
def test_bad_transform_values_name_the_argument(name, value, error):
    z = torch.randn(3, 11)
    with pytest.raises(error, match=name):
        kd_loss(z, z, backend="torch", **{name: value})
    h, w = torch.randn(3, 4), torch.randn(11, 4)
    with pytest.raises(error, match=name):
        multi_teacher_kd_loss(h, w, [h, h], [w, w], backend="torch", **{name: value})
    if name.startswith("teacher"):  # one bad entry of a per-teacher sequence
        good = None if name == "teacher_softcap" else 1.0
        with pytest.raises(error, match=rf"{name}\[1\]"):
            multi_teacher_kd_loss(h, w, [h, h], [w, w], backend="torch",
                                  **{name: [good, value]})


def test_bad_transform_shapes_and_keywords():
    h, w = torch.randn(3, 4), torch.randn(11, 4)
    for name in ["teacher_softcap", "teacher_logit_scale"]:
        with pytest.raises(ValueError, match=f"{name} has 3 values for 2 teachers"):
            multi_teacher_kd_loss(h, w, [h, h], [w, w], backend="torch", **{name: [1.0] * 3})
    ids = torch.zeros(3, 1, dtype=torch.int64)
    logits, lse = torch.zeros(3, 1), torch.zeros(3)
    for name in ["teacher_softcap", "teacher_logit_scale"]:  # a stored teacher has none
        with pytest.raises(TypeError, match=name):
            sparse_kd_loss(h, w, ids, logits, lse, backend="torch", **{name: 30.0})
    with pytest.raises(ValueError, match="student_softcap"):
        sparse_kd_loss(h, w, ids, logits, lse, backend="torch", student_softcap=-3.0)
    with pytest.raises(ValueError, match="student_softcap"):
        fused_kd_loss(h, w, h, w, backend="torch", student_softcap=0)
    with pytest.raises(TypeError, match="unknown option 'softcap'"):
        FusedKDLoss(softcap=30.0)
