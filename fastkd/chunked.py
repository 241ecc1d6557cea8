"""The token-chunk driver of the fused vocabulary losses (DESIGN.md section 4).

For each chunk of C tokens: two GEMMs with fp32 output give the student and teacher logits
(C, V); one row op turns them into the per-token loss and, in place of the student logits, the
gradient d loss / d z_s; two more GEMMs accumulate grad_hidden (C, Hs) and an fp32 grad_weight
(V, Hs). Only the chunk buffers and the fp32 grad_weight are ever extra memory.

Per-token scales g (1, 1 / n, or the incoming gradient of a ``reduction="none"`` loss) enter as
diag(g) dlogits: grad_hidden = diag(g) (dlogits W), grad_weight += dlogits^T (diag(g) h),
grad_bias += g^T dlogits, so the (C, V) buffer is never rescaled.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastkd.matmul import accumulation_dtype, addmm_, mm

DEFAULT_CHUNK_MEMORY = 256 * 2**20  # bytes for the fp32 logit buffers of one chunk


@dataclass
class Linear:
    """A frozen or trainable lm_head applied to hidden states: logits = hidden @ weight.T + bias."""

    hidden: torch.Tensor  # (N, H)
    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None  # (V,)


@dataclass
class StudentGrads:
    """Gradients of sum_i g_i loss_i with respect to the student's tensors (None if not asked)."""

    hidden: torch.Tensor | None  # (N, Hs), dtype of the hidden states
    weight: torch.Tensor | None  # (V, Hs), fp32
    bias: torch.Tensor | None  # (V,), fp32


def chunk_size_for(vocab: int, logit_buffers: int, chunk_size: int | None = None) -> int:
    """Tokens per chunk so that ``logit_buffers`` fp32 (C, V) buffers fit the memory budget.

    The budget is ``FASTKD_CHUNK_MEMORY`` bytes (default 256 MiB); ``chunk_size`` overrides it.
    """
    if chunk_size is not None:
        return chunk_size
    budget = int(os.environ.get("FASTKD_CHUNK_MEMORY", DEFAULT_CHUNK_MEMORY))
    rows = budget // (4 * vocab * logit_buffers)
    return max(16, rows // 16 * 16)


def logits_fp32(linear: Linear, rows: slice, out: torch.Tensor) -> torch.Tensor:
    """fp32 logits (C, V) of the tokens in ``rows`` into ``out``; never rounded to half."""
    mm(linear.hidden[rows], linear.weight.T, out=out)
    return out if linear.bias is None else out.add_(linear.bias)


def chunked_kd(
    student: Linear,
    teachers: list[Linear],
    labels: torch.Tensor | None,
    row_op: Callable[..., torch.Tensor],
    token_scale: torch.Tensor | None,
    need: tuple[bool, bool, bool],
    chunk_size: int,
) -> tuple[torch.Tensor, StudentGrads]:
    """Per-token loss (N,) (fp32; fp64 for fp64) and the student gradients of sum_i g_i loss_i.

    ``row_op(rows, student_logits (C, V), teacher_logits (K, C, V), labels, grad_out)``
    returns the chunk's loss and fills ``grad_out``. ``token_scale`` g is a scalar or (N,)
    tensor (None: no gradients); ``need`` says which of the (hidden, weight, bias) gradients
    to build.
    """
    tokens = student.hidden.shape[0]
    device = student.hidden.device
    loss = torch.empty(tokens, dtype=accumulation_dtype(student.weight), device=device)
    want_grads = token_scale is not None and any(need)
    grad_hidden = torch.empty_like(student.hidden) if want_grads and need[0] else None
    acc = dict(dtype=accumulation_dtype(student.weight), device=device)
    grad_weight = torch.zeros(student.weight.shape, **acc) if want_grads and need[1] else None
    grad_bias = torch.zeros(student.weight.shape[0], **acc) if want_grads and need[2] else None

    vocab = student.weight.shape[0]
    student_buffer = torch.empty(min(chunk_size, tokens), vocab, **acc)
    teacher_buffer = torch.empty(len(teachers), min(chunk_size, tokens), vocab, **acc)
    for start in range(0, tokens, chunk_size):
        rows = slice(start, min(start + chunk_size, tokens))
        count = rows.stop - rows.start
        student_logits = logits_fp32(student, rows, student_buffer[:count])
        teacher_logits = teacher_buffer[:, :count]
        for k, teacher in enumerate(teachers):
            logits_fp32(teacher, rows, teacher_logits[k])
        chunk_labels = labels[rows] if labels is not None else None
        grad_logits = student_logits if want_grads else None  # d loss / d z_s, in place
        loss[rows] = row_op(rows, student_logits, teacher_logits, chunk_labels, grad_logits)
        if not want_grads:
            continue
        per_token = token_scale[rows] if token_scale.dim() == 1 else token_scale.expand(count)
        scale = per_token[:, None]
        hidden = student.hidden[rows]
        operand = grad_logits.to(student.weight.dtype)  # cuBLAS wants matching dtypes
        if grad_hidden is not None:  # diag(g) (dlogits W)
            mm(operand, student.weight, out=grad_hidden[rows]).mul_(scale)
        if grad_weight is not None:  # dlogits^T (diag(g) h)
            addmm_(grad_weight, operand.T, (hidden * scale).to(operand.dtype))
        if grad_bias is not None:  # g^T dlogits
            grad_bias += (scale.T.to(grad_logits.dtype) @ grad_logits)[0]
    return loss, StudentGrads(grad_hidden, grad_weight, grad_bias)
