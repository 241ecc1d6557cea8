"""Backward of attention distillation: dQ and dK of the student, maps recomputed by tiles.

With the row LSEs (pass 1), the MSE deltas (pass 2) and a weight w_i = dL/d(row_loss_i) per
query row, the gradient with respect to the student's scaled scores s_ij is

  MSE: dS_ij = 2 w_i A_s,ij (A_s,ij - A_t,ij - delta_i)
  KL:  dS_ij = w_i (A_s,ij - A_t,ij)

and, since s_ij = scale_s q_i . k_j,

  dQ_i = scale_s sum_j dS_ij k_j              (one program per query tile: _dq_kernel)
  dK_j = scale_s sum_{h in group} sum_i dS_ij q_i   (one program per key tile: _dk_kernel)

The dK program loops over the query heads that share its key head (grouped-query attention),
so dK is written once, without atomics, and the result is deterministic. In both kernels, dS
is rounded to the input dtype before its matmul (as FlashAttention does); A and dS themselves
are fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_common import (
    attention_tiles,
    block_d,
    causal_key_end,
    causal_query_start,
    key_head,
    load_cols,
    load_row_stat,
    load_rows,
    query_tiles,
    scaled_scores,
    score_tiles,
    token_ok,
    visible_pairs_t,
)


@triton.jit
def _score_grad(a_s, a_t, w, delta, LOSS_MSE: tl.constexpr):
    """dL/ds for map tiles a_s, a_t; w and delta broadcast against them."""
    if LOSS_MSE:
        ds = 2.0 * w * a_s * (a_s - a_t - delta)
    else:
        ds = w * (a_s - a_t)
    return ds


@triton.jit
def _weight_and_delta(w_ptr, delta_ptr, bh, offs_m, L, LOSS_MSE: tl.constexpr):
    """w_i and, for MSE, delta_i of query rows offs_m (for KL delta is unused: w again)."""
    w = load_row_stat(w_ptr, bh, offs_m, L)
    delta = w
    if LOSS_MSE:
        delta = load_row_stat(delta_ptr, bh, offs_m, L)
    return w, delta


@triton.jit
def _dq_kernel(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, ok_ptr,
    lse_s_ptr, lse_t_ptr, delta_ptr, w_ptr, dq_ptr,
    scale_s, scale_t, H, L, DS, DT, GROUP_S, GROUP_T,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, LOSS_MSE: tl.constexpr,
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
    w, delta = _weight_and_delta(w_ptr, delta_ptr, bh, offs_m, L, LOSS_MSE)

    dq = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    for start_n in range(0, causal_key_end(start_m, L, BLOCK_M, CAUSAL), BLOCK_N):
        s, t, _, k_s_t = score_tiles(q_s, q_t, ks_ptr, kt_ptr, ok_ptr, row_ok, offs_m, start_n,
                                     L, DS, DT, scale_s, scale_t, CAUSAL, HAS_MASK, BLOCK_N,
                                     BLOCK_DS, BLOCK_DT)
        ds = _score_grad(tl.exp(s - lse_s), tl.exp(t - lse_t), w[:, None], delta[:, None],
                         LOSS_MSE)
        # dQ += dS K_s
        dq += tl.dot(ds.to(k_s_t.dtype), tl.trans(k_s_t), input_precision="ieee")

    dq *= scale_s
    offs_ds = tl.arange(0, BLOCK_DS)
    ptrs = dq_ptr + bh * L * DS + offs_m[:, None] * DS + offs_ds[None, :]
    mask = (offs_m[:, None] < L) & (offs_ds[None, :] < DS)
    tl.store(ptrs, dq.to(dq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dk_kernel(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, ok_ptr,
    lse_s_ptr, lse_t_ptr, delta_ptr, w_ptr, dk_ptr,
    scale_s, scale_t, H, L, DS, DT, GROUP_S, GROUP_T,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, LOSS_MSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):  # fmt: skip
    # Tiles here are transposed: rows are keys j (BLOCK_N), columns query rows i (BLOCK_M).
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1).to(tl.int64)  # b * H_kv + student key head
    heads_kv = H // GROUP_S
    b = bhk // heads_kv
    ok_ptr += b * L

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    key_ok = token_ok(ok_ptr, offs_n, L, HAS_MASK)
    k_s = load_rows(ks_ptr + bhk * L * DS, offs_n, L, offs_ds, DS)  # (BLOCK_N, BLOCK_DS)
    dk = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    for g in range(0, GROUP_S):
        bh = bhk * GROUP_S + g  # b * H + h for the query heads h of this key head
        k_t = load_rows(kt_ptr + key_head(bh, H, GROUP_T) * L * DT, offs_n, L, offs_dt, DT)
        for start_m in range(causal_query_start(start_n, BLOCK_M, CAUSAL), L, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = token_ok(ok_ptr, offs_m, L, HAS_MASK)
            visible = visible_pairs_t(row_ok, key_ok, offs_m, offs_n, CAUSAL)
            q_s_t = load_cols(qs_ptr + bh * L * DS, offs_m, L, offs_ds, DS)  # (BLOCK_DS, BLOCK_M)
            q_t_t = load_cols(qt_ptr + bh * L * DT, offs_m, L, offs_dt, DT)
            lse_s = load_row_stat(lse_s_ptr, bh, offs_m, L)[None, :]
            lse_t = load_row_stat(lse_t_ptr, bh, offs_m, L)[None, :]
            w, delta = _weight_and_delta(w_ptr, delta_ptr, bh, offs_m, L, LOSS_MSE)
            a_s = tl.exp(scaled_scores(k_s, q_s_t, scale_s, visible) - lse_s)  # A_s^T
            a_t = tl.exp(scaled_scores(k_t, q_t_t, scale_t, visible) - lse_t)
            ds = _score_grad(a_s, a_t, w[None, :], delta[None, :], LOSS_MSE)  # dS^T
            # dK += dS^T Q_s
            dk += tl.dot(ds.to(q_s_t.dtype), tl.trans(q_s_t), input_precision="ieee")

    dk *= scale_s
    ptrs = dk_ptr + bhk * L * DS + offs_n[:, None] * DS + offs_ds[None, :]
    mask = (offs_n[:, None] < L) & (offs_ds[None, :] < DS)
    tl.store(ptrs, dk.to(dk_ptr.dtype.element_ty), mask=mask)


def attention_backward(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    token_mask: torch.Tensor | None,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    delta: torch.Tensor | None,
    row_weight: torch.Tensor,
    *,
    causal: bool,
    scale_s: float,
    scale_t: float,
    interpreted: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dQ_s ``(B, H, L, Ds)`` and dK_s ``(B, Hs_kv, L, Ds)`` in the student's dtype.

    Inputs as for ``attention_mse``; delta (B, H, L) for MSE or None for KL; row_weight
    (B, H, L) fp32 contiguous, dL/d(row_loss) per query row.
    """
    batch, heads, length, d_s = q_s.shape
    heads_kv_s = k_s.shape[1]
    d_t = q_t.shape[-1]
    dq = torch.empty_like(q_s)
    dk = torch.empty_like(k_s)
    tiles = attention_tiles(d_s, d_t, (q_s.dtype, q_t.dtype), interpreted)
    dq_tiles, dk_tiles = tiles["dq"], tiles["dk"]
    args = (
        q_s, k_s, q_t, k_t, token_mask if token_mask is not None else lse_s,
        lse_s, lse_t, delta if delta is not None else lse_s, row_weight,
    )  # fmt: skip
    sizes = (scale_s, scale_t, heads, length, d_s, d_t, heads // heads_kv_s, heads // k_t.shape[1])
    flags = dict(
        CAUSAL=causal, HAS_MASK=token_mask is not None, LOSS_MSE=delta is not None,
        BLOCK_DS=block_d(d_s), BLOCK_DT=block_d(d_t),
    )  # fmt: skip
    _dq_kernel[(triton.cdiv(length, dq_tiles.block_m), batch * heads)](
        *args, dq, *sizes, **flags, BLOCK_M=dq_tiles.block_m, BLOCK_N=dq_tiles.block_n,
        num_warps=dq_tiles.num_warps,
    )  # fmt: skip
    _dk_kernel[(triton.cdiv(length, dk_tiles.block_n), batch * heads_kv_s)](
        *args, dk, *sizes, **flags, BLOCK_M=dk_tiles.block_m, BLOCK_N=dk_tiles.block_n,
        num_warps=dk_tiles.num_warps,
    )  # fmt: skip
    return dq, dk
