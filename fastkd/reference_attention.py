"""Float64 materializing oracle of ``attention_kd_loss`` (tests and benchmarks only).

Builds the full (B, H, L, L) attention maps; gradients come from autograd through it.
"""

from __future__ import annotations

import math

import torch


def _attention_map(
    q: torch.Tensor, k: torch.Tensor, scale: float | None, visible: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, log A) of softmax(scale q k^T) over visible keys, float64, 0 / -inf elsewhere."""
    q, k = q.double(), k.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA: head h uses h // group
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (scale * q @ k.transpose(-1, -2)).masked_fill(~visible, float("-inf"))
    log_a = torch.log_softmax(scores, dim=-1)
    a = log_a.exp().masked_fill(~visible, 0.0)  # padded rows (all -inf) give NaN: clear them
    return a, log_a.masked_fill(~visible, 0.0)


def attention_kd_loss_reference(
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
    """``attention_kd_loss`` by materialized float64 maps; ``backend`` is ignored.

    Shapes and semantics as in ``fastkd.attention_kd_loss``; the result is float64.
    """
    batch, heads, length, _ = student_q.shape
    device = student_q.device
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, device=device)
    real = attention_mask.to(device=device) != 0
    visible = real[:, None, :, None] & real[:, None, None, :]  # (B, 1, L, L)
    if causal:
        visible = visible & torch.ones(length, length, device=device, dtype=torch.bool).tril()
    a_s, log_s = _attention_map(student_q, student_k, student_scale, visible)
    a_t, log_t = _attention_map(teacher_q, teacher_k, teacher_scale, visible)
    if loss == "mse":
        row_loss = ((a_s - a_t) ** 2).sum(-1)
        per_row_count = length
    else:
        row_loss = (a_t * (log_t - log_s)).sum(-1)
        per_row_count = 1
    row_loss = row_loss * real[:, None, :]  # (B, H, L); padded query rows do not count
    if reduction == "none":
        return row_loss
    if reduction == "sum":
        return row_loss.sum()
    rows = heads * int(real.sum())
    return row_loss.sum() / (rows * per_row_count)
