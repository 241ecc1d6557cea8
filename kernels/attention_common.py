"""Tile helpers and block sizes shared by the attention-distillation kernels.

Layout used by every attention kernel: queries ``(B, H, L, D)`` and keys ``(B, H_kv, L, D)``,
contiguous; per-row statistics ``(B, H, L)`` in fp32; the token mask ``(B, L)`` as int8
(1 = real token). Query head ``h`` reads key head ``h // group`` (grouped-query attention).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Masked scores are -inf; running maxima start at this finite value so that a row whose first
# key tiles are all masked gives exp(-inf - m) = 0 and never exp(-inf + inf) = NaN.
NEG_BIG: tl.constexpr = tl.constexpr(-1.0e30)


@triton.jit
def load_rows(base_ptr, offs_row, n_rows, offs_d, d):
    """Tile X[offs_row, offs_d] of a row-major (n_rows, d) matrix, 0 outside it."""
    ptrs = base_ptr + offs_row[:, None] * d + offs_d[None, :]
    mask = (offs_row[:, None] < n_rows) & (offs_d[None, :] < d)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def load_cols(base_ptr, offs_row, n_rows, offs_d, d):
    """Transposed tile X[offs_row, offs_d]^T (shape BLOCK_D x rows), 0 outside the matrix."""
    ptrs = base_ptr + offs_row[None, :] * d + offs_d[:, None]
    mask = (offs_row[None, :] < n_rows) & (offs_d[:, None] < d)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def token_ok(ok_row_ptr, offs, L, HAS_MASK: tl.constexpr):
    """Tokens offs that exist (< L) and, with a mask, are real (mask == 1)."""
    ok = offs < L
    if HAS_MASK:
        ok = ok & (tl.load(ok_row_ptr + offs, mask=ok, other=0) != 0)
    return ok


@triton.jit
def visible_pairs(row_ok, key_ok, offs_m, offs_n, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N): row i counts and key j is visible to it (real; j <= i if causal)."""
    visible = row_ok[:, None] & key_ok[None, :]
    if CAUSAL:
        visible = visible & (offs_m[:, None] >= offs_n[None, :])
    return visible


@triton.jit
def visible_pairs_t(row_ok, key_ok, offs_m, offs_n, CAUSAL: tl.constexpr):
    """The transpose of ``visible_pairs``, shape (BLOCK_N, BLOCK_M)."""
    visible = key_ok[:, None] & row_ok[None, :]
    if CAUSAL:
        visible = visible & (offs_m[None, :] >= offs_n[:, None])
    return visible


@triton.jit
def scaled_scores(a, b_t, scale, visible):
    """S = scale * a @ b_t in fp32, -inf where a (query, key) pair is not visible.

    "ieee" keeps fp32 inputs exact (no TF32); it is ignored for bf16 / fp16 inputs, whose
    products are exact in the fp32 accumulator anyway.
    """
    s = tl.dot(a, b_t, input_precision="ieee") * scale
    return tl.where(visible, s, float("-inf"))


@triton.jit
def causal_key_end(start_m, L, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """End of the key loop for query rows [start_m, start_m + BLOCK_M).

    Causal: key j is visible to row i only if j <= i, so the tiles past the block's last row
    are never visited (skipped by the loop bound, not computed and masked).
    """
    end = L
    if CAUSAL:
        end = tl.minimum(start_m + BLOCK_M, L)
    return end


@triton.jit
def causal_query_start(start_n, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """Start of the query loop for key columns from start_n (the transposed bound).

    Causal: rows i < start_n see none of these keys; start at the query tile holding start_n.
    """
    start = 0
    if CAUSAL:
        start = (start_n // BLOCK_M) * BLOCK_M
    return start


def block_d(d: int) -> int:
    """Head dim padded to a power of two >= 16 (``tl.dot`` needs every dimension >= 16)."""
    return max(16, triton.next_power_of_2(d))


def attention_blocks(d_student: int, d_teacher: int, interpreted: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for the given head dims.

    The interpreter runs on CPU, where 32-row tiles keep tests fast and still cross tile edges.
    """
    if interpreted:
        return 64, 64, 4
    widest = max(block_d(d_student), block_d(d_teacher))
    if widest <= 64:
        return 64, 64, 4
    if widest <= 128:
        return 64, 64, 8
    return 32, 32, 8
