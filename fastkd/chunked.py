"""The token-chunk driver of the fused vocabulary losses (docs/design.md section 4).

For each chunk of C tokens: GEMMs with fp32 output give the student and teacher logits (C, V);
one row op turns them into the per-token loss and the gradient d loss / d z_s (in place of the
student logits, or into a half-precision buffer that collects several chunks); two more GEMMs
accumulate grad_hidden (C, Hs) and an fp32 grad_weight (V, Hs). Only the chunk buffers and the
fp32 grad_weight are ever extra memory.

Per-token scales g (1, 1 / n, or the incoming gradient of a ``reduction="none"`` loss) enter as
diag(g) dlogits: grad_hidden = diag(g) (dlogits W), grad_weight += dlogits^T (diag(g) h),
grad_bias += g^T dlogits, so the (C, V) buffer is never rescaled.

Mixed dtypes (autocast: bf16 hidden states against an fp32 lm_head, or a bias of another
dtype): every GEMM of that lm_head runs in fp32 (``gemm_dtype``), the narrower operand promoted
chunk by chunk by ``fastkd.matmul.mixed_mm`` (a (C, H) copy of the hidden rows, or slabs of the
weight; never a whole (V, H) or (N, H) copy), and d loss / d z_s stays fp32 in place of the
student logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastkd.matmul import accumulation_dtype, addmm_, mm
from fastkd.plan import ChunkPlan


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


def gemm_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of an lm_head's GEMM operands and of d loss / d z_s: the shared dtype of
    hidden and weight, or fp32 when they differ (fp64 never mixes: fastkd.functional
    check_linear refuses it)."""
    return weight.dtype if hidden.dtype == weight.dtype else torch.float32


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
    plan: ChunkPlan,
    ignore_index: int | None = None,
    parts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, StudentGrads]:
    """Per-token loss (N,) (fp32; fp64 for fp64) and the student gradients of sum_i g_i loss_i.

    ``row_op(rows, student_logits (C, V), teacher_logits (K, C, V), labels, grad_out,
    parts_out)`` returns the chunk's loss and fills ``grad_out`` and ``parts_out``; ``parts``
    (N, 2) in the loss's dtype, when given, receives each token's unweighted divergence and CE
    from the same pass (``parts_out`` is its chunk's rows; None without it). ``token_scale`` g
    is a scalar or (N,) tensor (None: no gradients); ``need`` says which of the (hidden,
    weight, bias) gradients to build. Tokens whose label is ``ignore_index`` add nothing to
    any gradient, even where their hidden states are NaN or inf.
    """
    tokens, vocab = student.hidden.shape[0], student.weight.shape[0]
    device = student.hidden.device
    acc = dict(dtype=accumulation_dtype(student.weight), device=device)
    want_grads = token_scale is not None and any(need)
    grad_hidden = torch.empty_like(student.hidden) if want_grads and need[0] else None
    # grad_weight's first gradient pass overwrites it (beta = 0): no zero fill, no extra read.
    # With no tokens there is no pass, so it starts as zeros then.
    make_weight_grad = torch.empty if tokens else torch.zeros
    grad_weight = make_weight_grad(student.weight.shape, **acc) if want_grads and need[1] else None
    grad_bias = torch.zeros(vocab, **acc) if want_grads and need[2] else None
    loss = torch.empty(tokens, **acc)

    rows_per_chunk = min(plan.rows, tokens)
    student_buffer = torch.empty(rows_per_chunk, vocab, **acc)
    teacher_buffer = torch.empty(len(teachers), rows_per_chunk, vocab, **acc)
    # The row op writes d loss / d z_s straight in the GEMM dtype, which the gradient GEMMs
    # read: in place of the fp32 student logits, or into a half buffer of plan.grad_rows rows.
    grad_dtype = gemm_dtype(student.hidden, student.weight)
    in_place = grad_dtype == acc["dtype"]
    grad_buffer = None
    if want_grads and not in_place:
        grad_buffer = torch.empty(min(plan.grad_rows, tokens), vocab, dtype=grad_dtype,
                                  device=device)

    for grad_start in range(0, tokens, plan.grad_rows):
        grad_rows = slice(grad_start, min(grad_start + plan.grad_rows, tokens))
        for start in range(grad_start, grad_rows.stop, plan.rows):
            rows = slice(start, min(start + plan.rows, grad_rows.stop))
            count = rows.stop - rows.start
            student_logits = logits_fp32(student, rows, student_buffer[:count])
            teacher_logits = teacher_buffer[:, :count]
            for k, teacher in enumerate(teachers):
                logits_fp32(teacher, rows, teacher_logits[k])
            grad_logits = None
            if want_grads:
                grad_logits = student_logits if in_place else grad_buffer[
                    start - grad_start : rows.stop - grad_start]
            chunk_labels = labels[rows] if labels is not None else None
            loss[rows] = row_op(rows, student_logits, teacher_logits, chunk_labels, grad_logits,
                                None if parts is None else parts[rows])
        if want_grads:
            grad_logits = student_buffer if in_place else grad_buffer
            counted = None
            if labels is not None and ignore_index is not None:
                counted = labels[grad_rows] != ignore_index
            _accumulate(student, grad_rows, grad_logits[: grad_rows.stop - grad_rows.start],
                        token_scale, grad_hidden, grad_weight, grad_bias, counted,
                        first=grad_start == 0)
    return loss, StudentGrads(grad_hidden, grad_weight, grad_bias)


def _accumulate(
    student: Linear,
    rows: slice,
    grad_logits: torch.Tensor,  # (R, V), gemm_dtype of the student
    token_scale: torch.Tensor,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
    grad_bias: torch.Tensor | None,
    counted: torch.Tensor | None = None,  # (R,) bool, False at ignored tokens
    first: bool = False,  # the first pass: grad_weight is overwritten, not accumulated into
) -> None:
    """The gradient GEMMs of the tokens in ``rows``, with per-token scales g.

    Ignored tokens get g = 0 and zero hidden rows by selection, not by multiplying, so a NaN
    or inf hidden state (or incoming gradient) there cannot reach any gradient (the row ops
    write zero dlogits rows for them).
    """
    count = rows.stop - rows.start
    per_token = token_scale[rows] if token_scale.dim() == 1 else token_scale.expand(count)
    if counted is not None:
        per_token = torch.where(counted, per_token, 0)
    scale = per_token[:, None]
    if grad_hidden is not None:  # diag(g) (dlogits W)
        mm(grad_logits, student.weight, out=grad_hidden[rows]).mul_(scale)
    if grad_weight is not None:  # dlogits^T (diag(g) h)
        scaled = student.hidden[rows] * scale
        if counted is not None:
            scaled = torch.where(counted[:, None], scaled, 0)
        addmm_(grad_weight, grad_logits.T, scaled.to(grad_logits.dtype), beta=0.0 if first else 1.0)
    if grad_bias is not None:  # g^T dlogits
        grad_bias += (scale.T.to(grad_logits.dtype) @ grad_logits)[0]
