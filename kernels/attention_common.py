"""Tile helpers and block sizes shared by the attention-distillation kernels.

Layout used by every attention kernel: queries ``(B, H, L, D)`` and keys ``(B, H_kv, L, D)``,
contiguous; per-row statistics ``(B, H, L)`` in fp32; the token mask ``(B, L)`` as int8
(1 = real token). Query head ``h`` reads key head ``h // group`` (grouped-query attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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
def key_head(bh, H, GROUP):
    """Index b * H_kv + h // GROUP of the key head that query head bh = b * H + h reads (GQA)."""
    return (bh // H) * (H // GROUP) + (bh % H) // GROUP


@triton.jit
def load_row_stat(stat_ptr, bh, offs_m, L):
    """Per-row statistic stat[bh, offs_m] of a (B * H, L) fp32 array, 0 past the end."""
    return tl.load(stat_ptr + bh * L + offs_m, mask=offs_m < L, other=0.0)


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
def query_tiles(qs_ptr, qt_ptr, ok_ptr, offs_m, L, DS, DT, HAS_MASK: tl.constexpr,
                BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr):
    """(row_ok, Q_s tile, Q_t tile) of query rows offs_m: which rows count, and their queries.

    qs_ptr, qt_ptr point at the (L, D) queries of one head, ok_ptr at the mask row of its batch.
    """
    row_ok = token_ok(ok_ptr, offs_m, L, HAS_MASK)
    q_s = load_rows(qs_ptr, offs_m, L, tl.arange(0, BLOCK_DS), DS)
    q_t = load_rows(qt_ptr, offs_m, L, tl.arange(0, BLOCK_DT), DT)
    return row_ok, q_s, q_t


@triton.jit
def score_tiles(q_s, q_t, ks_ptr, kt_ptr, ok_ptr, row_ok, offs_m, start_n, L, DS, DT,
                scale_s, scale_t, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr):
    """Student and teacher scores of query rows offs_m against key tile [start_n, + BLOCK_N).

    Returns (s, t, visible, K_s^T): s = scale_s Q_s K_s^T and t = scale_t Q_t K_t^T, each
    (BLOCK_M, BLOCK_N) fp32 and -inf where the pair is not visible; K_s^T (BLOCK_DS, BLOCK_N)
    is the student key tile, which dQ multiplies by.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    key_ok = token_ok(ok_ptr, offs_n, L, HAS_MASK)
    visible = visible_pairs(row_ok, key_ok, offs_m, offs_n, CAUSAL)
    k_s_t = load_cols(ks_ptr, offs_n, L, tl.arange(0, BLOCK_DS), DS)
    s = scaled_scores(q_s, k_s_t, scale_s, visible)
    t = scaled_scores(q_t, load_cols(kt_ptr, offs_n, L, tl.arange(0, BLOCK_DT), DT), scale_t,
                      visible)
    return s, t, visible, k_s_t


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


@dataclass(frozen=True)
class Tiles:
    """Block sizes and warp count of one attention kernel launch."""

    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int


# Compiled tiles by (16-bit inputs, widest padded head dim): the forward passes (LSE, MSE), dQ
# and dK. Picked from the sm_90 register use that ptxas reports (tests/test_compile_hopper.py
# checks the spills): at head dim 128 in bf16 the dK kernel spills 296 bytes per thread with
# 64 x 64 tiles and 8 with 128 x 32; fp32 inputs (exact "ieee" dots, no tensor cores) spill
# kilobytes above 32 x 32 tiles. Every entry spills at most 32 bytes, except fp32 dK at head
# dim 256 (112). Their speed on a GPU is still to be measured.
_COMPILED_TILES = {
    (True, 64): dict(forward=Tiles(64, 64, 4), dq=Tiles(64, 64, 4), dk=Tiles(64, 64, 8)),
    (True, 128): dict(forward=Tiles(64, 64, 8), dq=Tiles(64, 64, 8), dk=Tiles(128, 32, 8)),
    (True, 256): dict(forward=Tiles(64, 32, 8), dq=Tiles(16, 32, 4), dk=Tiles(32, 32, 8)),
    (False, 64): dict(forward=Tiles(32, 32, 4), dq=Tiles(32, 32, 4), dk=Tiles(32, 32, 8)),
    (False, 128): dict(forward=Tiles(32, 32, 8), dq=Tiles(32, 32, 8), dk=Tiles(16, 32, 8)),
    (False, 256): dict(forward=Tiles(16, 16, 4), dq=Tiles(16, 16, 4), dk=Tiles(16, 16, 8)),
}
# The interpreter runs on CPU: large tiles keep the tests fast, and lengths such as 70 still
# cross tile edges.
_INTERPRETED_TILES = dict(forward=Tiles(64, 64, 4), dq=Tiles(64, 64, 4), dk=Tiles(64, 64, 4))


def attention_tiles(
    d_student: int, d_teacher: int, dtypes: tuple[torch.dtype, ...], interpreted: bool
) -> dict[str, Tiles]:
    """The tiles of the "forward", "dq" and "dk" kernels for these head dims and input dtypes."""
    if interpreted:
        return _INTERPRETED_TILES
    sixteen_bit = all(dtype in (torch.bfloat16, torch.float16) for dtype in dtypes)
    return _COMPILED_TILES[(sixteen_bit, max(64, block_d(d_student), block_d(d_teacher)))]
