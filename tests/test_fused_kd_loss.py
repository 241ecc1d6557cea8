"""fused_kd_loss against the float64 oracle: loss and every student gradient."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastkd import fused_kd_loss
from fastkd.reference import fused_kd_loss_reference
from tests.helpers import NATIVE_BACKEND, linear_inputs, random_labels, rel_err, tolerance

DIVERGENCES = ["kl", "reverse_kl", "jsd"]
BACKENDS = ["torch", "triton", NATIVE_BACKEND]


def run_both(leading, hs, ht, vocab, dtype, device, seed, *, bias, labels=True, chunk_size=None,
             weight_grads=True, **options):
    """Loss and student gradients from fastkd and from the oracle, same inputs and weighting."""
    gen = torch.Generator().manual_seed(seed)
    std = options.pop("logit_std", 8.0)
    h_s, w_s, b_s = linear_inputs(leading, hs, vocab, std, dtype, device, gen, bias)
    h_t, w_t, b_t = linear_inputs(leading, ht, vocab, std, dtype, device, gen, bias)
    y = random_labels(leading, vocab, gen, device) if labels else None
    reduction = options.get("reduction", "mean")
    # For "none", weight each token differently so the per-token backward is really tested.
    token_weights = torch.rand(leading, generator=gen).to(device) + 0.5

    def total(loss):
        return (loss * token_weights.to(loss.dtype)).sum() if reduction == "none" else loss

    students = [t for t in (h_s, w_s, b_s) if t is not None]
    ours = [t.clone().requires_grad_(weight_grads or i == 0) for i, t in enumerate(students)]
    refs = [t.clone().double().requires_grad_(weight_grads or i == 0) for i, t in enumerate(students)]
    loss = fused_kd_loss(ours[0], ours[1], h_t, w_t, y, student_bias=ours[2] if bias else None,
                         teacher_bias=b_t, chunk_size=chunk_size, **options)
    ref = fused_kd_loss_reference(refs[0], refs[1], h_t, w_t, y,
                                  student_bias=refs[2] if bias else None, teacher_bias=b_t,
                                  **{k: v for k, v in options.items() if k != "backend"})
    total(loss).backward()
    total(ref).backward()
    return loss, ref, ours, refs


GRID = list(itertools.product(DIVERGENCES, [1.0, 2.5], ["mean", "sum", "none"], [False, True],
                              [torch.float32, torch.bfloat16, torch.float16], BACKENDS))


@pytest.mark.parametrize("divergence,temperature,reduction,bias,dtype,backend", GRID)
def test_matches_oracle(divergence, temperature, reduction, bias, dtype, backend, device):
    seed = hash((divergence, temperature, reduction, bias, str(dtype), backend)) % 2**31
    loss, ref, ours, refs = run_both(
        (2, 5), 24, 40, 389, dtype, device, seed, bias=bias, divergence=divergence,
        temperature=temperature, beta=0.3, soft_weight=0.7, hard_weight=0.4, reduction=reduction,
        backend=backend, chunk_size=4, logit_std=[3.0, 10.0, 30.0][seed % 3],
    )
    tol = tolerance(dtype)
    assert loss.shape == ref.shape
    assert rel_err(loss, ref) < tol
    for mine, theirs in zip(ours, refs):
        assert mine.grad.dtype == mine.dtype
        assert rel_err(mine.grad, theirs.grad) < tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("logit_std", [3.0, 30.0])
def test_saturated_distributions(divergence, logit_std, backend, device):
    """Near one-hot teacher and student (std 30, T = 1): gradients stay accurate in fp32."""
    loss, ref, ours, refs = run_both((7,), 16, 16, 1031, torch.float32, device, 11, bias=False,
                                     divergence=divergence, logit_std=logit_std, backend=backend)
    assert rel_err(loss, ref) < 1e-4
    for mine, theirs in zip(ours, refs):
        assert rel_err(mine.grad, theirs.grad) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token_and_odd_vocab(backend, device):
    """N = 1 and a prime vocab that is no multiple of any block size."""
    loss, ref, ours, refs = run_both((1,), 8, 12, 2053, torch.float32, device, 3, bias=True,
                                     divergence="jsd", hard_weight=1.0, backend=backend)
    assert rel_err(loss, ref) < 1e-4
    for mine, theirs in zip(ours, refs):
        assert rel_err(mine.grad, theirs.grad) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_dimensional_leading_shape_and_no_labels(backend, device):
    loss, ref, ours, refs = run_both((2, 3, 2), 8, 8, 97, torch.float32, device, 5, bias=False,
                                     labels=False, reduction="none", backend=backend)
    assert loss.shape == (2, 3, 2)
    assert rel_err(loss, ref) < 1e-4
    for mine, theirs in zip(ours, refs):
        assert rel_err(mine.grad, theirs.grad) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_tokens_ignored(backend, reduction, device):
    """No counted token: loss 0 (never NaN) and zero gradients."""
    gen = torch.Generator().manual_seed(0)
    h_s, w_s, _ = linear_inputs((6,), 8, 50, 5.0, torch.float32, device, gen)
    h_t, w_t, _ = linear_inputs((6,), 8, 50, 5.0, torch.float32, device, gen)
    h_s.requires_grad_()
    w_s.requires_grad_()
    labels = torch.full((6,), -100, device=device)
    loss = fused_kd_loss(h_s, w_s, h_t, w_t, labels, hard_weight=1.0, reduction=reduction,
                         backend=backend)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(h_s.grad, torch.zeros_like(h_s))
    assert torch.equal(w_s.grad, torch.zeros_like(w_s))


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunking_does_not_change_the_result(backend, device):
    gen = torch.Generator().manual_seed(2)
    inputs = [*linear_inputs((23,), 8, 64, 6.0, torch.float32, device, gen)[:2],
              *linear_inputs((23,), 8, 64, 6.0, torch.float32, device, gen)[:2]]
    losses = [fused_kd_loss(*inputs, divergence="reverse_kl", backend=backend, chunk_size=c)
              for c in (1, 5, 23, 64)]
    # fp32 against fp32: the chunk size changes the GEMM shapes and so their rounding (2e-7
    # here; blocking and FMA use vary with the CPU); a chunking bug is off by far more
    for other in losses[1:]:
        torch.testing.assert_close(other, losses[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_skips_gradient_work(backend, device, monkeypatch):
    """Under torch.no_grad() (or with frozen students) the chunk driver builds no gradients."""
    import fastkd.autograd as autograd_module

    seen = []
    real = autograd_module.chunked_kd

    def spy(*args):
        seen.append(args[4])  # token_scale: None means no gradient work
        return real(*args)

    monkeypatch.setattr(autograd_module, "chunked_kd", spy)
    gen = torch.Generator().manual_seed(4)
    h_s, w_s, _ = linear_inputs((5,), 8, 40, 4.0, torch.float32, device, gen)
    h_t, w_t, _ = linear_inputs((5,), 8, 40, 4.0, torch.float32, device, gen)
    h_s.requires_grad_()
    with torch.no_grad():
        graded = fused_kd_loss(h_s, w_s, h_t, w_t, backend=backend)
    frozen = fused_kd_loss(h_s.detach(), w_s, h_t, w_t, backend=backend)
    assert seen == [None, None]
    assert not graded.requires_grad and not frozen.requires_grad
    torch.testing.assert_close(graded, frozen)
    assert torch.isfinite(graded)


def test_teacher_gets_no_gradient(device):
    gen = torch.Generator().manual_seed(8)
    h_s, w_s, _ = linear_inputs((4,), 8, 30, 4.0, torch.float32, device, gen)
    h_t, w_t, _ = linear_inputs((4,), 8, 30, 4.0, torch.float32, device, gen)
    for t in (h_s, h_t, w_t):
        t.requires_grad_()
    fused_kd_loss(h_s, w_s, h_t, w_t, backend="torch").backward()
    assert h_s.grad is not None and h_t.grad is None and w_t.grad is None


def test_gradcheck_float64_torch_backend():
    gen = torch.Generator().manual_seed(9)
    h_s, w_s, b_s = linear_inputs((3,), 5, 11, 3.0, torch.float64, "cpu", gen, bias=True)
    h_t, w_t, _ = linear_inputs((3,), 6, 11, 3.0, torch.float64, "cpu", gen)
    labels = torch.tensor([1, -100, 7])
    for divergence in DIVERGENCES:
        for reduction in ("mean", "none"):
            def fn(h, w, b, divergence=divergence, reduction=reduction):
                return fused_kd_loss(h, w, h_t, w_t, labels, student_bias=b, temperature=1.5,
                                     divergence=divergence, hard_weight=0.5, reduction=reduction,
                                     backend="torch", chunk_size=2)

            args = [t.clone().requires_grad_() for t in (h_s, w_s, b_s)]
            assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_give_nan_not_a_finite_loss(backend, device):
    """NaN or +inf in a counted token's logits makes its loss (and so the mean) NaN."""
    gen = torch.Generator().manual_seed(1)
    h_s, w_s, _ = linear_inputs((4,), 8, 30, 4.0, torch.float32, device, gen)
    h_t, w_t, _ = linear_inputs((4,), 8, 30, 4.0, torch.float32, device, gen)
    for bad in (float("nan"), float("inf")):
        poisoned = h_t.clone()
        poisoned[2, 3] = bad
        per_token = fused_kd_loss(h_s, w_s, poisoned, w_t, reduction="none", backend=backend)
        assert torch.isnan(per_token[2])
        assert torch.isfinite(per_token[[0, 1, 3]]).all()
        assert torch.isnan(fused_kd_loss(h_s, w_s, poisoned, w_t, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_logits_are_not_rounded_before_the_softmax(backend, device):
    """bf16 inputs with fp32 math: JSD gradients within 1e-2 (rounded logits give 4-23%)."""
    loss, ref, ours, refs = run_both((16,), 64, 64, 3001, torch.bfloat16, device, 21, bias=False,
                                     divergence="jsd", logit_std=20.0, backend=backend,
                                     chunk_size=8)
    assert rel_err(loss, ref) < 1e-2
    for mine, theirs in zip(ours, refs):
        assert rel_err(mine.grad, theirs.grad) < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_gradients_collected_over_several_chunks(backend, device):
    """bf16 weights: d loss / d z_s of 8 chunks share one gradient GEMM pass (16 + 16 + 5 rows)."""
    loss, ref, ours, refs = run_both((37,), 16, 24, 211, torch.bfloat16, device, 31, bias=True,
                                     divergence="reverse_kl", hard_weight=0.5, backend=backend,
                                     chunk_size=2)
    assert rel_err(loss, ref) < 1e-2
    for mine, theirs in zip(ours, refs):
        assert rel_err(mine.grad, theirs.grad) < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_is_refused(backend, reduction, device):
    """create_graph=True (a gradient penalty) raises: the gradients are built in forward as
    constants, and a grad with requires_grad=False would make the penalty add nothing."""
    gen = torch.Generator().manual_seed(31)
    h_s, w_s, _ = linear_inputs((5,), 8, 37, 6.0, torch.float32, device, gen)
    h_t, w_t, _ = linear_inputs((5,), 8, 37, 6.0, torch.float32, device, gen)
    h_s.requires_grad_()
    loss = fused_kd_loss(h_s, w_s, h_t, w_t, reduction=reduction, backend=backend).sum()
    with pytest.raises(RuntimeError, match="fused_kd_loss does not support double backward"):
        torch.autograd.grad(loss, h_s, create_graph=True)
    (grad,) = torch.autograd.grad(loss, h_s)  # first order still works
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_labels_equal_int64_labels(backend, device):
    """int32 labels give the int64 result, also with an ignore_index outside the int32 range
    (torch would wrap it in an int32 comparison, so that -100 were ignored: 2**32 - 100
    == -100 mod 2**32; the kernels would not)."""
    gen = torch.Generator().manual_seed(34)
    h_s, w_s, _ = linear_inputs((3, 7), 8, 211, 10.0, torch.float32, device, gen)
    h_t, w_t, _ = linear_inputs((3, 7), 8, 211, 10.0, torch.float32, device, gen)
    labels = random_labels((3, 7), 211, gen, device)
    for ignore_index, hard_weight in ((-100, 0.5), (2**32 - 100, 0.0)):
        losses = [fused_kd_loss(h_s, w_s, h_t, w_t, labels.to(dtype), hard_weight=hard_weight,
                                ignore_index=ignore_index, reduction="none", backend=backend)
                  for dtype in (torch.int64, torch.int32)]
        torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    assert (losses[1] != 0).all()  # no label equals 2**32 - 100: every token counts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_ignored_tokens_add_nothing(backend, reduction, dtype, device):
    """NaN / inf hidden states at ignored tokens (left padding of some attention
    implementations) change neither the loss nor any student gradient."""
    gen = torch.Generator().manual_seed(35)
    leading, vocab = (3, 7), 203
    h_s, w_s, b_s = linear_inputs(leading, 12, vocab, 10.0, dtype, device, gen, bias=True)
    h_t, w_t, _ = linear_inputs(leading, 16, vocab, 10.0, dtype, device, gen)
    labels = random_labels(leading, vocab, gen, device)
    labels[0, :3] = -100
    ignored = labels == -100
    weights = torch.rand(leading, generator=gen).to(device) + 0.5

    def run(student_hidden, teacher_hidden):
        leaves = [t.clone().requires_grad_() for t in (student_hidden, w_s, b_s)]
        loss = fused_kd_loss(leaves[0], leaves[1], teacher_hidden, w_t, labels,
                             student_bias=leaves[2], divergence="jsd", hard_weight=0.3,
                             reduction=reduction, backend=backend, chunk_size=5)
        (loss * weights if reduction == "none" else loss).sum().backward()
        return [loss.detach()] + [t.grad for t in leaves]

    clean = run(h_s, h_t)
    for bad in (float("nan"), float("inf")):
        poisoned_s, poisoned_t = h_s.clone(), h_t.clone()
        poisoned_s[ignored] = bad
        poisoned_t[ignored] = -bad
        got = run(poisoned_s, poisoned_t)
        for name, g, want in zip(("loss", "hidden", "weight", "bias"), got, clean, strict=True):
            assert torch.isfinite(g).all(), (bad, name)
            torch.testing.assert_close(g, want, rtol=0, atol=0, msg=f"{bad} {name}")
