"""Pass 2 of attention distillation (MSE): each query row's loss and the backward's delta.

With the row LSEs of pass 1, the maps are recomputed tile by tile and never stored:
A_s,ij = exp(s_ij - LSE_s,i), A_t,ij = exp(t_ij - LSE_t,i) (0 where j is not visible to i).

  row_loss_i = sum_j (A_s,ij - A_t,ij)^2
  delta_i    = sum_j A_s,ij (A_s,ij - A_t,ij)

The backward needs delta (FlashAttention's D): with G = dL/dA_s = 2 w_i (A_s - A_t) for a row
weight w_i, dL/ds_ij = A_s,ij (G_ij - sum_k A_s,ik G_ik) = 2 w_i A_s,ij (A_s,ij - A_t,ij - delta_i).
Invisible columns (masked or above the diagonal) hold 0 in both maps and add nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_common import (
    attention_tiles,
    block_d,
    causal_key_end,
    key_head,
    load_row_stat,
    query_tiles,
    score_tiles,
)


@triton.jit
def _attention_mse_kernel(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, ok_ptr,
    lse_s_ptr, lse_t_ptr, loss_ptr, delta_ptr,
    scale_s, scale_t, H, L, DS, DT, GROUP_S, GROUP_T,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)  # b * H + h
    ks_ptr += key_head(bh, H, GROUP_S) * L * DS
    kt_ptr += key_head(bh, H, GROUP_T) * L * DT
    ok_ptr += (bh // H) * L
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok, q_s, q_t = query_tiles(qs_ptr + bh * L * DS, qt_ptr + bh * L * DT, ok_ptr, offs_m,
                                   L, DS, DT, HAS_MASK, BLOCK_DS, BLOCK_DT)
    lse_s = load_row_stat(lse_s_ptr, bh, offs_m, L)[:, None]
    lse_t = load_row_stat(lse_t_ptr, bh, offs_m, L)[:, None]

    loss = tl.zeros([BLOCK_M], tl.float32)
    delta = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, causal_key_end(start_m, L, BLOCK_M, CAUSAL), BLOCK_N):
        s, t, _, _ = score_tiles(q_s, q_t, ks_ptr, kt_ptr, ok_ptr, row_ok, offs_m, start_n, L,
                                 DS, DT, scale_s, scale_t, CAUSAL, HAS_MASK, BLOCK_N, BLOCK_DS,
                                 BLOCK_DT)
        a_s = tl.exp(s - lse_s)  # exp(-inf) = 0 where invisible
        diff = a_s - tl.exp(t - lse_t)
        loss += tl.sum(diff * diff, 1)
        delta += tl.sum(a_s * diff, 1)

    in_range = offs_m < L
    tl.store(loss_ptr + bh * L + offs_m, loss, mask=in_range)
    tl.store(delta_ptr + bh * L + offs_m, delta, mask=in_range)


def attention_mse(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    token_mask: torch.Tensor | None,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    *,
    causal: bool,
    scale_s: float,
    scale_t: float,
    interpreted: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row losses sum_j (A_s - A_t)^2 and row deltas, both ``(B, H, L)`` fp32.

    Inputs as for ``attention_lse``, plus its row LSEs ``(B, H, L)``.
    """
    batch, heads, length, d_s = q_s.shape
    d_t = q_t.shape[-1]
    loss = torch.empty_like(lse_s)
    delta = torch.empty_like(lse_s)
    tiles = attention_tiles(d_s, d_t, (q_s.dtype, q_t.dtype), interpreted)["forward"]
    grid = (triton.cdiv(length, tiles.block_m), batch * heads)
    _attention_mse_kernel[grid](
        q_s, k_s, q_t, k_t, token_mask if token_mask is not None else lse_s,
        lse_s, lse_t, loss, delta,
        scale_s, scale_t, heads, length, d_s, d_t,
        heads // k_s.shape[1], heads // k_t.shape[1],
        CAUSAL=causal, HAS_MASK=token_mask is not None,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        BLOCK_DS=block_d(d_s), BLOCK_DT=block_d(d_t), num_warps=tiles.num_warps,
    )  # fmt: skip
    return loss, delta
