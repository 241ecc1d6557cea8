"""The "torch" backend of ``attention_kd_loss``: blocks of query rows, any device.

Each block of R query rows builds its (B, H, R, L) score tiles, so extra memory is
O(B x H x R x L), never L x L; causal blocks stop at their last row's key. The forward returns
per-row losses; the backward recomputes the blocks (same math as the Triton kernels:
kernels/attention_backward.py). Computation is in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch

# Score elements per block and per map; a few fp32 temporaries of this size live at once.
BLOCK_ELEMENTS = 1 << 22


def prepare(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    real: torch.Tensor | None,
) -> tuple[torch.Tensor | None, ...]:
    """Operands in the compute dtype; ``real`` (B, L) bool or None."""
    dtype = torch.promote_types(q_s.dtype, torch.float32)
    return q_s.to(dtype), k_s.to(dtype), q_t.to(dtype), k_t.to(dtype), real


def _row_blocks(batch: int, heads: int, length: int):
    rows = max(1, BLOCK_ELEMENTS // (batch * heads * length))
    for start in range(0, length, rows):
        yield start, min(start + rows, length)


def _grouped(x: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """(B, H, ...) viewed as (B, H_kv, H / H_kv, ...): query head h = kv head h // group."""
    return x.unflatten(1, (heads_kv, x.shape[1] // heads_kv))


def _maps(q, k, scale, visible):
    """(A, log A) for query rows q (B, H, R, D) against keys k (B, H_kv, Lk, D).

    A is 0 where a pair is not visible; log A is only meaningful where it is.
    """
    scores = _grouped(q, k.shape[1]) @ k[:, :, None].transpose(-1, -2)
    scores = (scale * scores).flatten(1, 2).masked_fill(~visible, float("-inf"))
    log_a = torch.log_softmax(scores, dim=-1)
    return log_a.exp().masked_fill(~visible, 0.0), log_a  # padded rows: NaN -> 0


def _block(q_s, k_s, q_t, k_t, real, start, end, causal, scale_s, scale_t):
    """Maps of query rows [start, end): (A_s, log A_s, A_t, log A_t, visible, key count)."""
    batch, _, length, _ = q_s.shape
    keys = end if causal else length
    if real is None:
        real = torch.ones(batch, length, device=q_s.device, dtype=torch.bool)
    visible = real[:, None, start:end, None] & real[:, None, None, :keys]  # (B, 1, R, keys)
    if causal:
        rows = torch.arange(start, end, device=q_s.device)[:, None]
        visible = visible & (rows >= torch.arange(keys, device=q_s.device)[None, :])
    a_s, log_s = _maps(q_s[:, :, start:end], k_s[:, :, :keys], scale_s, visible)
    a_t, log_t = _maps(q_t[:, :, start:end], k_t[:, :, :keys], scale_t, visible)
    return a_s, log_s, a_t, log_t, visible, keys


def forward(q_s, k_s, q_t, k_t, real, *, loss, causal, scale_s, scale_t):
    """Row losses (B, H, L) (MSE: sum_j (A_s - A_t)^2; KL: KL(A_t || A_s)) and no saved state."""
    batch, heads, length, _ = q_s.shape
    row_loss = q_s.new_empty(batch, heads, length)
    for start, end in _row_blocks(batch, heads, length):
        a_s, log_s, a_t, log_t, visible, _ = _block(
            q_s, k_s, q_t, k_t, real, start, end, causal, scale_s, scale_t
        )
        if loss == "mse":
            block_loss = (a_s - a_t).square().sum(-1)
        else:
            block_loss = (a_t * (log_t - log_s)).masked_fill(~visible, 0.0).sum(-1)
        row_loss[:, :, start:end] = block_loss
    return row_loss, ()


def backward(q_s, k_s, q_t, k_t, real, saved, row_weight, *, loss, causal, scale_s, scale_t):
    """dQ_s, dK_s for row weights dL/d(row_loss) (B, H, L); see kernels/attention_backward.py."""
    batch, heads, length, _ = q_s.shape
    heads_kv = k_s.shape[1]
    dq = torch.zeros_like(q_s)
    dk = torch.zeros_like(k_s)
    for start, end in _row_blocks(batch, heads, length):
        a_s, _, a_t, _, _, keys = _block(
            q_s, k_s, q_t, k_t, real, start, end, causal, scale_s, scale_t
        )
        w = row_weight[:, :, start:end, None].to(a_s.dtype)
        diff = a_s - a_t
        if loss == "mse":  # dS = 2 w A_s (A_s - A_t - delta), delta = sum_j A_s (A_s - A_t)
            ds = 2.0 * w * a_s * (diff - (a_s * diff).sum(-1, keepdim=True))
        else:  # dS = w (A_s - A_t)
            ds = w * diff
        ds = _grouped(ds, heads_kv)  # (B, H_kv, group, R, keys)
        dq[:, :, start:end] = scale_s * (ds @ k_s[:, :, None, :keys]).flatten(1, 2)
        q_block = _grouped(q_s[:, :, start:end], heads_kv)
        dk[:, :, :keys] += scale_s * (ds.transpose(-1, -2) @ q_block).sum(2)
    return dq, dk
