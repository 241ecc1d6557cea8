"""attention_kd_loss against the float64 materializing oracle: loss, dQ and dK of the student.

Triton runs compiled on a GPU and in the interpreter on CPU (tests/conftest.py); the shapes are
small because the interpreter is slow.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastkd.kernels.attention_backward as kernel_backward
import fastkd.kernels.attention_loss as kernel_loss
import fastkd.kernels.attention_lse as kernel_lse
from fastkd.attention import attention_kd_loss
from fastkd.kernels.attention_common import Tiles
from fastkd.reference_attention import attention_kd_loss_reference
from tests.conftest import DEVICE
from tests.helpers import rel_err, tolerance

BACKENDS = ("triton", "torch")


def make_inputs(batch, heads, length, d_s, d_t, kv_s, kv_t, dtype=torch.float32, seed=0):
    """Student q, k (requiring grad) and teacher q, k whose scores have std about 4."""
    gen = torch.Generator().manual_seed(seed)

    def draw(heads_, dim, grad):
        x = 2.0 * torch.randn(batch, heads_, length, dim, generator=gen)
        return x.to(device=DEVICE, dtype=dtype).requires_grad_(grad)

    return (draw(heads, d_s, True), draw(kv_s, d_s, True),
            draw(heads, d_t, False), draw(kv_t, d_t, False))  # fmt: skip


def padding_mask(batch, length, left=3, right=11):
    """Row 0 left-padded, row 1 right-padded (when long enough), the rest full."""
    mask = torch.ones(batch, length, dtype=torch.long)
    if length > left + right:
        mask[0, :left] = 0
        if batch > 1:
            mask[1, length - right :] = 0
    return mask.to(DEVICE)


def check_against_oracle(inputs, dtype=torch.float32, grad_out=None, **kwargs):
    """Loss, dQ_s and dK_s of attention_kd_loss within tolerance of the float64 oracle."""
    q_s, k_s, q_t, k_t = inputs
    out = attention_kd_loss(q_s, k_s, q_t, k_t, **kwargs)
    leaves = [x.detach().double().requires_grad_() for x in (q_s, k_s)]
    ref = attention_kd_loss_reference(*leaves, q_t, k_t, **kwargs)
    grad_out = torch.ones_like(ref) if grad_out is None else grad_out
    grads = torch.autograd.grad(out, (q_s, k_s), grad_out.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, leaves, grad_out)
    tol = tolerance(dtype)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < tol, (rel_err(out, ref), out, ref)
    for name, got, want in zip(("dQ", "dK"), grads, ref_grads, strict=True):
        assert got.dtype == dtype and got.shape == want.shape
        assert rel_err(got, want) < tol, (name, rel_err(got, want))
    return out, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["mse", "kl"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_oracle(backend, loss, causal, padded):
    # GQA on both sides with different groups (4 query heads, 2 and 1 key heads), head dims
    # that differ (16 vs 24, neither a power of two for the teacher), L = 70 (tail tiles).
    inputs = make_inputs(2, 4, 70, 16, 24, 2, 1, seed=hash((loss, causal, padded)) % 1000)
    mask = padding_mask(2, 70) if padded else None
    check_against_oracle(inputs, loss=loss, causal=causal, attention_mask=mask, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_s, kv_t", [(3, 3), (1, 3), (3, 1)], ids=["mha", "gqa_s", "gqa_t"])
def test_grouped_query_attention(backend, kv_s, kv_t):
    inputs = make_inputs(1, 3, 17, 8, 32, kv_s, kv_t, seed=kv_s * 10 + kv_t)
    check_against_oracle(inputs, loss="mse", causal=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["mse", "kl"])
@pytest.mark.parametrize("length", [1, 17])
def test_short_lengths(backend, loss, length):
    inputs = make_inputs(2, 2, length, 32, 16, 1, 2, seed=length)
    mask = padding_mask(2, length, left=2, right=4)
    check_against_oracle(inputs, loss=loss, causal=False, attention_mask=mask, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["mse", "kl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision(backend, loss, dtype):
    inputs = make_inputs(2, 2, 70, 32, 16, 1, 2, dtype=dtype, seed=7)
    mask = padding_mask(2, 70)
    out, _ = check_against_oracle(
        inputs, dtype, loss=loss, causal=True, attention_mask=mask, backend=backend
    )
    assert out.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["mse", "kl"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(backend, loss, reduction):
    inputs = make_inputs(2, 2, 17, 16, 16, 2, 1, seed=3)
    mask = padding_mask(2, 17, left=2, right=5)
    grad_out = None
    if reduction == "none":  # a per-row upstream gradient exercises the row weights
        grad_out = torch.randn(2, 2, 17, generator=torch.Generator().manual_seed(1)).double()
    out, _ = check_against_oracle(
        inputs, grad_out=grad_out.to(DEVICE) if grad_out is not None else None, loss=loss,
        causal=True, attention_mask=mask, reduction=reduction, backend=backend,
    )  # fmt: skip
    if reduction == "none":
        assert out.shape == (2, 2, 17)
        assert torch.all(out[0, :, :2] == 0) and torch.all(out[1, :, -5:] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_given_scales(backend):
    inputs = make_inputs(1, 2, 17, 16, 16, 2, 2, seed=11)
    check_against_oracle(
        inputs, loss="kl", causal=True, student_scale=0.4, teacher_scale=0.1, backend=backend
    )


@pytest.mark.parametrize("block_m, block_n", [(16, 32), (32, 16)])
def test_kernel_tiles_other_than_default(monkeypatch, block_m, block_n):
    # Many tiles per row and per column, BLOCK_M != BLOCK_N, and dQ / dK tiles that differ from
    # the forward ones: the causal loop bounds of all passes (rows stop at their last key; dK
    # columns start at their first query tile).
    tiles = dict(forward=Tiles(block_m, block_n, 4), dq=Tiles(block_n, block_m, 4),
                 dk=Tiles(block_m, block_n, 2))
    for module in (kernel_lse, kernel_loss, kernel_backward):
        monkeypatch.setattr(module, "attention_tiles", lambda *args: tiles)
    inputs = make_inputs(1, 2, 70, 16, 16, 1, 2, seed=block_m)
    for loss in ("mse", "kl"):
        check_against_oracle(
            inputs, loss=loss, causal=True, attention_mask=padding_mask(1, 70), backend="triton"
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_mse_is_f_mse_loss_on_materialized_maps(backend):
    q_s, k_s, q_t, k_t = make_inputs(1, 2, 17, 16, 16, 2, 2, seed=5)
    out = attention_kd_loss(q_s, k_s, q_t, k_t, loss="mse", causal=True, backend=backend)
    causal = torch.ones(17, 17, dtype=torch.bool, device=DEVICE).tril()
    maps = [
        torch.softmax((q @ k.transpose(-1, -2) / 4.0).masked_fill(~causal, -math.inf), -1)
        for q, k in ((q_s, k_s), (q_t, k_t))
    ]
    assert rel_err(out, F.mse_loss(*maps)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_minilmv2_query_query_relations(backend):
    # MiniLMv2: split hidden queries into R relation heads by reshaping, then relate the
    # queries to themselves (K := Q). Student hidden 48, teacher hidden 96, R = 4 relation heads.
    gen = torch.Generator().manual_seed(2)
    batch, length, heads = 2, 17, 4
    student = (2 * torch.randn(batch, length, 48, generator=gen)).to(DEVICE).requires_grad_()
    teacher = (2 * torch.randn(batch, length, 96, generator=gen)).to(DEVICE)

    def relation_heads(x):  # (B, L, hidden) -> (B, R, L, hidden / R)
        return x.unflatten(-1, (heads, -1)).transpose(1, 2)

    s, t = relation_heads(student), relation_heads(teacher)
    out = attention_kd_loss(s, s, t, t, loss="kl", causal=False, backend=backend)
    (grad,) = torch.autograd.grad(out, student)

    leaf = student.detach().double().requires_grad_()
    rel_s = torch.log_softmax(relation_heads(leaf) @ relation_heads(leaf).mT / 12**0.5, -1)
    t64 = relation_heads(teacher.double())
    rel_t = torch.log_softmax(t64 @ t64.mT / 24**0.5, -1)
    ref = F.kl_div(rel_s, rel_t, log_target=True, reduction="sum") / (batch * heads * length)
    (ref_grad,) = torch.autograd.grad(ref, leaf)
    assert rel_err(out, ref) < 1e-4
    assert rel_err(grad, ref_grad) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_masks_and_teacher_gradients(backend):
    # Non-contiguous (B, L, H, D) storage, a bool mask and a teacher that requires grad.
    gen = torch.Generator().manual_seed(9)
    leaves = [
        (2 * torch.randn(2, 17, heads, 16, generator=gen)).to(DEVICE).requires_grad_()
        for heads in (2, 1, 2, 2)
    ]
    mask = padding_mask(2, 17, left=1, right=3)
    out = attention_kd_loss(
        *[x.transpose(1, 2) for x in leaves], attention_mask=mask.bool(), backend=backend
    )
    out.backward()
    doubles = [x.detach().double().requires_grad_() for x in leaves]
    ref = attention_kd_loss_reference(
        *[x.transpose(1, 2) for x in doubles], attention_mask=mask.float()
    )
    ref.backward()
    assert rel_err(out, ref) < 1e-4
    for got, want in zip(leaves[:2], doubles[:2], strict=True):
        assert rel_err(got.grad, want.grad) < 1e-4
    assert leaves[2].grad is None and leaves[3].grad is None  # no gradient to the teacher


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad(backend):
    q_s, k_s, q_t, k_t = make_inputs(1, 2, 17, 16, 16, 1, 1, seed=4)
    with torch.no_grad():
        out = attention_kd_loss(q_s, k_s, q_t, k_t, backend=backend)
    ref = attention_kd_loss_reference(q_s.detach(), k_s.detach(), q_t, k_t)
    assert not out.requires_grad and rel_err(out, ref) < 1e-4


def test_public_names_and_module():
    import fastkd
    import fastkd.nn
    import fastkd.reference

    assert fastkd.attention_kd_loss is attention_kd_loss
    assert fastkd.reference.attention_kd_loss_reference is attention_kd_loss_reference
    inputs = make_inputs(1, 2, 17, 16, 8, 1, 2, seed=6)
    module = fastkd.nn.AttentionKDLoss(loss="kl", causal=False, backend="torch")
    mask = padding_mask(1, 17)
    out = module(*inputs, attention_mask=mask)
    ref = attention_kd_loss(*inputs, loss="kl", causal=False, attention_mask=mask, backend="torch")
    assert torch.equal(out, ref) and "loss='kl'" in repr(module)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused(backend):
    """create_graph=True raises: the backends' dQ, dK are not differentiable again (the Triton
    ones silently came back with requires_grad=False)."""
    q_s, k_s, q_t, k_t = make_inputs(1, 2, 7, 8, 8, 2, 2, seed=5)
    loss = attention_kd_loss(q_s, k_s, q_t, k_t, backend=backend)
    with pytest.raises(RuntimeError, match="attention_kd_loss does not support double backward"):
        torch.autograd.grad(loss, (q_s, k_s), create_graph=True)
    grads = torch.autograd.grad(loss, (q_s, k_s))
    assert all(torch.isfinite(g).all() for g in grads)
