"""Attention-map distillation without materializing attention: ``attention_kd_loss``.

The public function checks its arguments and picks a backend; ``AttentionKDLossFunction``
runs the backend's forward (per-row losses) and backward (dQ, dK of the student). Backends:
"triton" (kernels/attention_*.py, FlashAttention-style tiles) and "torch" (attention_torch.py,
blocks of query rows). Neither holds an L x L tensor.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

import fastkd.ops  # noqa: F401  (registers the attention custom ops)
from fastkd import attention_torch
from fastkd._checks import (
    REDUCTIONS,
    check_choice,
    check_floating,
    check_positive,
    check_same_device,
    check_tensor,
    resolve_backend,
    triton_interpreted,
)
from fastkd.autograd import refuse_double_backward

LOSSES = ("mse", "kl")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_KERNEL_HEAD_DIM = 256


def _kernel_side(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k of one side in one dtype the kernels take (fp32 unless both are fp16/bf16).

    The Triton interpreter multiplies the raw bits of bf16 operands in ``tl.dot``
    (triton-lang/triton#11584, unsupported there), so interpreted runs upcast bf16 to fp32;
    compiled kernels take bf16 as it is (and fp16 exercises the same code in the interpreter).
    """
    dtype = q.dtype if q.dtype == k.dtype and q.dtype in KERNEL_DTYPES else torch.float32
    if dtype == torch.bfloat16 and triton_interpreted():
        dtype = torch.float32
    return q.to(dtype).contiguous(), k.to(dtype).contiguous()


def _triton_prepare(q_s, k_s, q_t, k_t, real):
    real = real.to(torch.int8).contiguous() if real is not None else None
    return (*_kernel_side(q_s, k_s), *_kernel_side(q_t, k_t), real)


def _triton_forward(q_s, k_s, q_t, k_t, real, *, loss, causal, scale_s, scale_t):
    row_loss, lse_s, lse_t, delta = torch.ops.fastkd.attention_forward_triton(
        q_s, k_s, q_t, k_t, real, loss, causal, scale_s, scale_t)
    return row_loss, (lse_s, lse_t, delta)


def _triton_backward(q_s, k_s, q_t, k_t, real, saved, row_weight, *, loss, causal, scale_s,
                     scale_t):  # fmt: skip
    return torch.ops.fastkd.attention_backward_triton(
        q_s, k_s, q_t, k_t, real, *saved, row_weight, loss, causal, scale_s, scale_t)


def _torch_forward(q_s, k_s, q_t, k_t, real, *, loss, causal, scale_s, scale_t):
    row_loss = torch.ops.fastkd.attention_forward_torch(
        q_s, k_s, q_t, k_t, real, loss, causal, scale_s, scale_t)
    return row_loss, ()


def _torch_backward(q_s, k_s, q_t, k_t, real, saved, row_weight, *, loss, causal, scale_s,
                    scale_t):  # fmt: skip
    return torch.ops.fastkd.attention_backward_torch(
        q_s, k_s, q_t, k_t, real, row_weight, loss, causal, scale_s, scale_t)


# The backends' forward and backward are custom ops (fastkd/ops.py), opaque to torch.compile.
BACKENDS = {
    "triton": SimpleNamespace(
        prepare=_triton_prepare, forward=_triton_forward, backward=_triton_backward
    ),
    "torch": SimpleNamespace(
        prepare=attention_torch.prepare, forward=_torch_forward, backward=_torch_backward
    ),
}


class AttentionKDLossFunction(torch.autograd.Function):
    """Autograd of ``attention_kd_loss`` on checked arguments; teacher tensors get no gradient.

    ``real`` is the (B, L) bool token mask or None; ``divisor`` turns the summed loss into the
    requested reduction (None for "none").
    """

    @staticmethod
    def forward(ctx, q_s, k_s, q_t, k_t, real, loss, causal, scale_s, scale_t, divisor, backend):
        ops = BACKENDS[backend]
        operands = ops.prepare(q_s, k_s, q_t, k_t, real)
        options = dict(loss=loss, causal=causal, scale_s=scale_s, scale_t=scale_t)
        row_loss, saved = ops.forward(*operands, **options)
        ctx.save_for_backward(*operands, *saved)
        ctx.ops, ctx.options, ctx.divisor = ops, options, divisor
        ctx.dtypes = (q_s.dtype, k_s.dtype)
        out_dtype = torch.promote_types(q_s.dtype, torch.float32)
        if divisor is None:
            return row_loss.to(out_dtype)
        return (row_loss.sum() / divisor).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("attention_kd_loss")  # the backends' gradients are first order
        q_s, k_s, q_t, k_t, real, *saved = ctx.saved_tensors
        grad_q = grad_k = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_out = grad_out.float()
            if ctx.divisor is not None:
                grad_out = (grad_out / ctx.divisor).expand(q_s.shape[:3])
            dq, dk = ctx.ops.backward(q_s, k_s, q_t, k_t, real, saved, grad_out, **ctx.options)
            grad_q, grad_k = dq.to(ctx.dtypes[0]), dk.to(ctx.dtypes[1])
        return grad_q, grad_k, None, None, None, None, None, None, None, None, None


def _check_side(side: str, q: torch.Tensor, k: torch.Tensor) -> None:
    """q (B, H, L, D) and k (B, H_kv, L, D) of one side agree; H_kv divides H."""
    qn, kn = f"{side}_q", f"{side}_k"
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(
            f"{kn} shape {tuple(k.shape)} must have the batch and length of {qn} shape "
            f"{tuple(q.shape)} (B, H_kv, L, D) vs (B, H, L, D)"
        )
    if k.shape[3] != q.shape[3]:
        raise ValueError(
            f"{qn} head dim {q.shape[3]} and {kn} head dim {k.shape[3]} must be equal "
            f"(shapes {tuple(q.shape)} and {tuple(k.shape)})"
        )
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"{kn} has {k.shape[1]} key heads, which must divide the {q.shape[1]} query heads "
            f"of {qn} (grouped-query attention)"
        )


def _check_mask(
    mask: torch.Tensor, batch: int, length: int
) -> tuple[torch.Tensor, int | torch.Tensor]:
    """The (B, L) bool mask of real tokens, and the number of real tokens (a 0-dim tensor
    under ``torch.compile``)."""
    if tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"attention_mask shape {tuple(mask.shape)} must be (B, L) = {(batch, length)}"
        )
    if mask.dtype.is_complex:
        raise TypeError(f"attention_mask must be a bool, integer or float tensor, got {mask.dtype}")
    real = mask != 0
    if torch.compiler.is_compiling():
        # A host read of the mask would break the graph: the checks become device asserts
        # (a RuntimeError when the graph runs) and the token count stays a tensor.
        torch._assert_async(((mask == 0) | (mask == 1)).all(),
                            "attention_mask must hold only 0 (padding) and 1 (real token)")
        torch._assert_async(real.any(1).all(), "attention_mask has a row with no real token: "
                            "its query rows have no valid key")
        return real, real.sum()
    # One host sync for both checks: real tokens per batch row, then the count of non-0/1 values.
    *per_row, not_binary = torch.cat([real.sum(1), (real & (mask != 1)).sum()[None]]).tolist()
    if not_binary:
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    empty = [b for b, count in enumerate(per_row) if count == 0]
    if empty:
        raise ValueError(
            f"attention_mask rows {empty} have no real token: their query rows have no valid key"
        )
    return real, sum(per_row)


def attention_kd_loss(
    student_q: torch.Tensor,
    student_k: torch.Tensor,
    teacher_q: torch.Tensor,
    teacher_k: torch.Tensor,
    *,
    loss: str = "mse",
    causal: bool = True,
    attention_mask: torch.Tensor | None = None,
    student_scale: float | None = None,
    teacher_scale: float | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Distance between student and teacher attention maps, without materializing them.

    A = softmax(scale Q K^T + mask) per batch, head and query row, for student and teacher.

    Args:
        student_q: (B, H, L, Ds); student_k: (B, Hs_kv, L, Ds), Hs_kv dividing H (query head h
            reads key head h // (H / Hs_kv)).
        teacher_q: (B, H, L, Dt); teacher_k: (B, Ht_kv, L, Dt). Teacher tensors get no gradient.
        loss: "mse" (squared differences of A_s and A_t) or "kl" (KL(A_t row || A_s row)).
        causal: keys j > i are invisible to query row i.
        attention_mask: (B, L), 1 = real token, 0 = padding; padded keys are removed from every
            row and padded query rows from the loss. Every batch row needs a real token.
        student_scale / teacher_scale: score scales, default 1 / sqrt(head dim).
        reduction: "mean": MSE divides the sum of squares over real query rows and all L key
            columns by (real rows x L), which is ``F.mse_loss(A_s, A_t)`` without padding; KL
            averages over real rows (rows = H x real tokens). "sum": the undivided sum.
            "none": (B, H, L) per query row (MSE: sum over keys of squares; KL: the row KL),
            0 at padded rows, so that "sum" equals its sum.
        backend: "auto" (triton on CUDA, torch elsewhere), "triton" or "torch".

    Returns:
        A scalar, or (B, H, L) for "none"; fp32 (fp64 for fp64 student inputs).
    """
    for name, value in (("student_q", student_q), ("student_k", student_k),
                        ("teacher_q", teacher_q), ("teacher_k", teacher_k)):  # fmt: skip
        check_floating(name, value, ndim=4)
    check_choice("loss", loss, LOSSES)
    check_choice("reduction", reduction, REDUCTIONS)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    _check_side("student", student_q, student_k)
    _check_side("teacher", teacher_q, teacher_k)
    batch, heads, length, d_s = student_q.shape
    if teacher_q.shape[:3] != student_q.shape[:3]:
        raise ValueError(
            f"teacher_q shape {tuple(teacher_q.shape)} must match student_q shape "
            f"{tuple(student_q.shape)} in batch, query heads and length (B, H, L, D)"
        )
    if 0 in student_q.shape or teacher_q.shape[3] == 0:
        raise ValueError(
            f"attention inputs must not be empty, got student_q {tuple(student_q.shape)} and "
            f"teacher_q {tuple(teacher_q.shape)}"
        )
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, ndim=2)
    device = check_same_device(
        [("student_q", student_q), ("student_k", student_k), ("teacher_q", teacher_q),
         ("teacher_k", teacher_k), ("attention_mask", attention_mask)]
    )  # fmt: skip
    backend = resolve_backend(backend, device)
    d_t = teacher_q.shape[3]
    if backend == "triton" and max(d_s, d_t) > MAX_KERNEL_HEAD_DIM:
        raise ValueError(
            f"backend='triton' supports head dims up to {MAX_KERNEL_HEAD_DIM}, got student "
            f"{d_s} and teacher {d_t}; use backend='torch'"
        )
    scale_s = 1.0 / math.sqrt(d_s) if student_scale is None else student_scale
    scale_t = 1.0 / math.sqrt(d_t) if teacher_scale is None else teacher_scale
    scale_s = check_positive("student_scale", scale_s)
    scale_t = check_positive("teacher_scale", scale_t)

    if attention_mask is None:
        real, tokens = None, batch * length
    else:
        real, tokens = _check_mask(attention_mask, batch, length)
    divisor = None  # reduction "none"
    if reduction == "sum":
        divisor = 1.0
    elif reduction == "mean":
        divisor = heads * tokens * (length if loss == "mse" else 1)
        divisor = divisor.float() if isinstance(divisor, torch.Tensor) else float(divisor)
    return AttentionKDLossFunction.apply(
        student_q, student_k, teacher_q.detach(), teacher_k.detach(), real, loss, causal,
        scale_s, scale_t, divisor, backend,
    )  # fmt: skip
