"""Pass 1 of attention distillation: each query row's log-sum-exp, student and teacher.

For query row i of head h, scores s_ij = scale_s q_s[i] . k_s[j] and t_ij = scale_t q_t[i] . k_t[j]
over the keys j visible to i (real tokens; j <= i when causal). Online softmax over key tiles:
running max m and running sum l = sum_j exp(x_j - m); when a tile raises m to m', l is rescaled
by exp(m - m'). LSE = m + log l.

With ``COMPUTE_KL`` the same sweep gives the MiniLM loss KL(A_t row || A_s row) in one pass
(docs/design.md section 3): keep a = sum_j exp(t_j - m_t) (t_j - s_j), rescaled like l_t; then
KL = sum_j A_t,ij (t_ij - LSE_t - s_ij + LSE_s) = a / l_t - LSE_t + LSE_s.

Rows of padded query tokens get LSE 0 and loss 0; every real row sees at least its own key.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_common import (
    NEG_BIG,
    attention_tiles,
    block_d,
    causal_key_end,
    key_head,
    query_tiles,
    score_tiles,
)


@triton.jit
def _online_update(m, total, x):
    """Fold score tile x into the running max m and sum; returns (m', sum', exp(x - m'), alpha).

    alpha = exp(m - m') rescales every running sum kept against the old max.
    """
    m_new = tl.maximum(m, tl.max(x, 1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(x - m_new[:, None])
    return m_new, total * alpha + tl.sum(p, 1), p, alpha


@triton.jit
def _attention_lse_kernel(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, ok_ptr,
    lse_s_ptr, lse_t_ptr, kl_ptr,
    scale_s, scale_t, H, L, DS, DT, GROUP_S, GROUP_T,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, COMPUTE_KL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)  # b * H + h; int64 so that bh * L * D cannot overflow
    ks_ptr += key_head(bh, H, GROUP_S) * L * DS
    kt_ptr += key_head(bh, H, GROUP_T) * L * DT
    ok_ptr += (bh // H) * L
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok, q_s, q_t = query_tiles(qs_ptr + bh * L * DS, qt_ptr + bh * L * DT, ok_ptr, offs_m,
                                   L, DS, DT, HAS_MASK, BLOCK_DS, BLOCK_DT)

    m_s = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    m_t = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    a = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, causal_key_end(start_m, L, BLOCK_M, CAUSAL), BLOCK_N):
        s, t, visible, _ = score_tiles(q_s, q_t, ks_ptr, kt_ptr, ok_ptr, row_ok, offs_m, start_n,
                                       L, DS, DT, scale_s, scale_t, CAUSAL, HAS_MASK, BLOCK_N,
                                       BLOCK_DS, BLOCK_DT)
        m_s, l_s, p_s, alpha_s = _online_update(m_s, l_s, s)
        m_t, l_t, p_t, alpha_t = _online_update(m_t, l_t, t)
        if COMPUTE_KL:
            # a += sum_j exp(t_j - m_t) (t_j - s_j); invisible pairs have p_t = 0 and
            # t = s = -inf, so they are zeroed before the difference (no inf - inf).
            t_minus_s = tl.where(visible, t, 0.0) - tl.where(visible, s, 0.0)
            a = a * alpha_t + tl.sum(p_t * t_minus_s, 1)

    # Padded rows saw no key (l = 0): store LSE 0 so later passes give exp(-inf - 0) = 0.
    # (l is replaced by 1 there first, so that no log(0) or 0 / 0 is ever evaluated.)
    l_s = tl.where(row_ok, l_s, 1.0)
    l_t = tl.where(row_ok, l_t, 1.0)
    lse_s = tl.where(row_ok, m_s + tl.log(l_s), 0.0)
    lse_t = tl.where(row_ok, m_t + tl.log(l_t), 0.0)
    in_range = offs_m < L
    tl.store(lse_s_ptr + bh * L + offs_m, lse_s, mask=in_range)
    tl.store(lse_t_ptr + bh * L + offs_m, lse_t, mask=in_range)
    if COMPUTE_KL:
        kl = tl.where(row_ok, a / l_t - lse_t + lse_s, 0.0)
        tl.store(kl_ptr + bh * L + offs_m, kl, mask=in_range)


def attention_lse(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    token_mask: torch.Tensor | None,
    *,
    causal: bool,
    scale_s: float,
    scale_t: float,
    compute_kl: bool,
    interpreted: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row LSEs ``(B, H, L)`` fp32 of student and teacher, and the row KL when ``compute_kl``.

    q_s (B, H, L, Ds), k_s (B, Hs_kv, L, Ds), q_t (B, H, L, Dt), k_t (B, Ht_kv, L, Dt), all
    contiguous; token_mask (B, L) int8 or None. q and k of one side share a dtype.
    """
    batch, heads, length, d_s = q_s.shape
    d_t = q_t.shape[-1]
    lse_s = torch.empty((batch, heads, length), device=q_s.device, dtype=torch.float32)
    lse_t = torch.empty_like(lse_s)
    kl = torch.empty_like(lse_s) if compute_kl else lse_s  # lse_s is a placeholder, never read
    tiles = attention_tiles(d_s, d_t, (q_s.dtype, q_t.dtype), interpreted)["forward"]
    grid = (triton.cdiv(length, tiles.block_m), batch * heads)
    _attention_lse_kernel[grid](
        q_s, k_s, q_t, k_t, token_mask if token_mask is not None else lse_s,
        lse_s, lse_t, kl,
        scale_s, scale_t, heads, length, d_s, d_t,
        heads // k_s.shape[1], heads // k_t.shape[1],
        CAUSAL=causal, HAS_MASK=token_mask is not None, COMPUTE_KL=compute_kl,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        BLOCK_DS=block_d(d_s), BLOCK_DT=block_d(d_t), num_warps=tiles.num_warps,
    )  # fmt: skip
    return lse_s, lse_t, kl if compute_kl else None
