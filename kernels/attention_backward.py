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
    attention_blocks,
    block_d,
    causal_key_end,
    causal_query_start,
    load_cols,
    load_rows,
    scaled_scores,
    token_ok,
    visible_pairs,
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
    b = bh // H
    h = bh % H
    qs_ptr += bh * L * DS
    qt_ptr += bh * L * DT
    dq_ptr += bh * L * DS
    ks_ptr += (b * (H // GROUP_S) + h // GROUP_S) * L * DS
    kt_ptr += (b * (H // GROUP_T) + h // GROUP_T) * L * DT
    ok_ptr += b * L

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    in_range = offs_m < L
    row_ok = token_ok(ok_ptr, offs_m, L, HAS_MASK)
    q_s = load_rows(qs_ptr, offs_m, L, offs_ds, DS)
    q_t = load_rows(qt_ptr, offs_m, L, offs_dt, DT)
    lse_s = tl.load(lse_s_ptr + bh * L + offs_m, mask=in_range, other=0.0)[:, None]
    lse_t = tl.load(lse_t_ptr + bh * L + offs_m, mask=in_range, other=0.0)[:, None]
    w = tl.load(w_ptr + bh * L + offs_m, mask=in_range, other=0.0)[:, None]
    delta = w  # unused by KL
    if LOSS_MSE:
        delta = tl.load(delta_ptr + bh * L + offs_m, mask=in_range, other=0.0)[:, None]

    dq = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    for start_n in range(0, causal_key_end(start_m, L, BLOCK_M, CAUSAL), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = token_ok(ok_ptr, offs_n, L, HAS_MASK)
        visible = visible_pairs(row_ok, key_ok, offs_m, offs_n, CAUSAL)
        k_s_t = load_cols(ks_ptr, offs_n, L, offs_ds, DS)  # (BLOCK_DS, BLOCK_N)
        a_s = tl.exp(scaled_scores(q_s, k_s_t, scale_s, visible) - lse_s)
        t = scaled_scores(q_t, load_cols(kt_ptr, offs_n, L, offs_dt, DT), scale_t, visible)
        ds = _score_grad(a_s, tl.exp(t - lse_t), w, delta, LOSS_MSE)
        # dQ += dS K_s
        dq += tl.dot(ds.to(k_s_t.dtype), tl.trans(k_s_t), input_precision="ieee")

    dq *= scale_s
    ptrs = dq_ptr + offs_m[:, None] * DS + offs_ds[None, :]
    mask = in_range[:, None] & (offs_ds[None, :] < DS)
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
        h = bh % H
        kt_head_ptr = kt_ptr + (b * (H // GROUP_T) + h // GROUP_T) * L * DT
        k_t = load_rows(kt_head_ptr, offs_n, L, offs_dt, DT)
        for start_m in range(causal_query_start(start_n, BLOCK_M, CAUSAL), L, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            in_range = offs_m < L
            row_ok = token_ok(ok_ptr, offs_m, L, HAS_MASK)
            visible = visible_pairs_t(row_ok, key_ok, offs_m, offs_n, CAUSAL)
            q_s_t = load_cols(qs_ptr + bh * L * DS, offs_m, L, offs_ds, DS)  # (BLOCK_DS, BLOCK_M)
            q_t_t = load_cols(qt_ptr + bh * L * DT, offs_m, L, offs_dt, DT)
            lse_s = tl.load(lse_s_ptr + bh * L + offs_m, mask=in_range, other=0.0)[None, :]
            lse_t = tl.load(lse_t_ptr + bh * L + offs_m, mask=in_range, other=0.0)[None, :]
            w = tl.load(w_ptr + bh * L + offs_m, mask=in_range, other=0.0)[None, :]
            delta = w  # unused by KL
            if LOSS_MSE:
                delta = tl.load(delta_ptr + bh * L + offs_m, mask=in_range, other=0.0)[None, :]
            a_s = tl.exp(scaled_scores(k_s, q_s_t, scale_s, visible) - lse_s)  # A_s^T
            a_t = tl.exp(scaled_scores(k_t, q_t_t, scale_t, visible) - lse_t)
            ds = _score_grad(a_s, a_t, w, delta, LOSS_MSE)  # dS^T
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
    block_m, block_n, num_warps = attention_blocks(d_s, d_t, interpreted)
    args = (
        q_s, k_s, q_t, k_t, token_mask if token_mask is not None else lse_s,
        lse_s, lse_t, delta if delta is not None else lse_s, row_weight,
    )  # fmt: skip
    sizes = (scale_s, scale_t, heads, length, d_s, d_t, heads // heads_kv_s, heads // k_t.shape[1])
    meta = dict(
        CAUSAL=causal, HAS_MASK=token_mask is not None, LOSS_MSE=delta is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DS=block_d(d_s), BLOCK_DT=block_d(d_t),
        num_warps=num_warps,
    )  # fmt: skip
    _dq_kernel[(triton.cdiv(length, block_m), batch * heads)](*args, dq, *sizes, **meta)
    _dk_kernel[(triton.cdiv(length, block_n), batch * heads_kv_s)](*args, dk, *sizes, **meta)
    return dq, dk
