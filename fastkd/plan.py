"""The chunk plan of the fused vocabulary losses, and the bytes-and-FLOPs model of its time.

Tokens N, vocab V, student width Hs, teacher widths Ht_k, K teachers, C tokens per chunk.
Each chunk re-reads every lm_head, so the logit GEMMs move V (Hs + sum Ht) weight bytes per C
tokens: their arithmetic intensity is about C FLOP per weight byte (bf16), and they stay
compute-bound only for C above the machine's ridge (peak FLOP/s over bandwidth: ~300 on an
H100 in bf16). The plan therefore picks C for speed first (``SPEED_ROWS``: 512 on CUDA, 256 on
CPU, the knee of the GEMMs measured there), within a cap on the chunk's working set
(``FASTKD_CHUNK_MEMORY`` bytes, default ``DEFAULT_CHUNK_MEMORY``); ``chunk_size=`` tokens
overrides both. With half-precision weights the gradient rows of several chunks collect in one
half buffer, from the cap's spare room, so that the fp32 weight gradient is read and written
once per ``grad_rows`` tokens rather than once per chunk.

When the shapes are known the plan is the fastest by ``predict`` within the cap. At the
headline shape (N = 8192, V = 128,256, Hs = 2048, Ht = 4096, bf16, CUDA, the 896 MiB cap) that
is C = 512 with a 1,024-row bf16 gradient buffer: 0.53 GB of fp32 logit buffers and 0.26 GB
of gradient rows beside the 1.05 GB fp32 weight gradient (1.84 GB extra), predicted 1.21x
the matmul floor (128-token chunks: 1.81x). At V = 256,000: C = 304 with 608 gradient rows
(0.93 GB), 1.26x. A larger ``FASTKD_CHUNK_MEMORY`` buys rows up to ``SPEED_ROWS``; a smaller
one (or ``chunk_size=``) trades speed for memory.
"""

from __future__ import annotations

import functools
import math
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Tokens per chunk at which the logit GEMMs stop being weight-bandwidth-bound, by device type.
SPEED_ROWS = {"cuda": 512, "cpu": 256}
# Default cap on a chunk's working set in bytes (FASTKD_CHUNK_MEMORY overrides), by device type.
DEFAULT_CHUNK_MEMORY = {"cuda": 896 * 2**20, "cpu": 320 * 2**20}
# At most this many chunks' gradient rows collect in the half-precision gradient buffer.
GRAD_CHUNKS = 8
ROW_ALIGN = 16


@dataclass(frozen=True)
class ChunkPlan:
    """Tokens per chunk of logits, and tokens per gradient GEMM pass (a multiple of it)."""

    rows: int
    grad_rows: int


def chunk_buffers(backend: str, teachers: int) -> int:
    """fp32 (C, V) buffers alive at a chunk's peak: the K + 1 logit buffers; the torch row op
    adds its log-softmaxes, softmaxes and elementwise temporaries (about 2K + 6 more)."""
    return 3 * teachers + 7 if backend == "torch" else teachers + 1


@dataclass(frozen=True)
class Machine:
    """Peak GEMM throughput (FLOP/s, in the weights' dtype) and memory bandwidth (bytes/s)."""

    name: str
    flops: float
    bandwidth: float


H100 = Machine("H100 SXM (bf16 dense)", 790e12, 3.35e12)  # docs/design.md section 6
H200 = Machine("H200 SXM (bf16 dense)", 989e12, 4.8e12)  # NVIDIA's datasheet peaks


@dataclass(frozen=True)
class Cost:
    """Predicted FLOPs, bytes and seconds of one call; ``floor`` is FLOPs / peak."""

    flops: float
    bytes: float
    seconds: float
    floor: float

    @property
    def ratio(self) -> float:
        """Predicted time over the matmul floor."""
        return self.seconds / self.floor


def predict(
    plan: ChunkPlan,
    tokens: int,
    vocab: int,
    student_hidden: int,
    teacher_hiddens: Sequence[int],
    weight_bytes: int,
    machine: Machine,
    *,
    grads: bool = True,
    row_passes: int = 2,
) -> Cost:
    """The time of ``fused_kd_loss`` / ``multi_teacher_kd_loss`` by bytes and FLOPs moved.

    Three phases, each taking max(FLOPs / peak, bytes / bandwidth): the logit GEMMs (every
    chunk reads both lm_heads and its hidden rows and writes fp32 logits), the row op
    (``row_passes`` reads of the K + 1 fp32 rows, one gradient write), and the gradient GEMMs
    (per pass over ``grad_rows`` tokens: the gradient rows and the student weight are read, the
    fp32 weight gradient read and written).
    """
    n, v, hs = tokens, vocab, student_hidden
    k = len(teacher_hiddens)
    width = hs + sum(teacher_hiddens)
    chunks = math.ceil(n / plan.rows)
    logit_flops = 2 * n * v * width
    logit_bytes = (chunks * v * width + n * width) * weight_bytes + n * v * 4 * (k + 1)
    grad_bytes_per = weight_bytes if weight_bytes < 4 else 4
    row_bytes = n * v * 4 * (k + 1) * row_passes + (n * v * grad_bytes_per if grads else 0)
    phases = [(logit_flops, logit_bytes), (0.0, row_bytes)]
    if grads:
        passes = math.ceil(n / plan.grad_rows)
        grad_flops = 4 * n * v * hs
        grad_bytes = (2 * n * v * grad_bytes_per + passes * v * hs * (weight_bytes + 8)
                      + 3 * n * hs * weight_bytes)
        phases.append((grad_flops, grad_bytes))
    flops = sum(f for f, _ in phases)
    total_bytes = sum(b for _, b in phases)
    seconds = sum(max(f / machine.flops, b / machine.bandwidth) for f, b in phases)
    return Cost(flops, total_bytes, seconds, flops / machine.flops)


# The machines the plan is chosen for, by device type and weight bytes: an H100 for CUDA, and
# the 2-core CPU machines of the project's CI, from the matmul floor and a streaming add
# measured there (benchmarks/results/cpu-side-by-side-20261203-071317.json: fp32 GEMMs 257
# GFLOP/s, bf16 920 with the MKL half GEMMs, 27 GB/s).
PLAN_MACHINES = {
    ("cuda", 2): H100, ("cuda", 4): Machine("H100 SXM (tf32)", 395e12, 3.35e12),
    ("cpu", 2): Machine("2-core x86 CPU (bf16)", 920e9, 27e9),
    ("cpu", 4): Machine("2-core x86 CPU (fp32)", 257e9, 27e9),
}


def plan_chunks(
    vocab: int,
    teachers: int,
    backend: str,
    half_weights: bool,
    chunk_size: int | None = None,
    device_type: str = "cpu",
    widths: tuple[int, ...] | None = None,
    tokens: int | None = None,
) -> ChunkPlan:
    """The plan of one call: ``chunk_size`` tokens, or the fastest plan within the cap.

    ``widths`` (Hs, Ht_1, ..., Ht_K) and ``tokens`` N, when given, let ``predict`` choose the
    rows per chunk (multiples of 16 up to ``SPEED_ROWS``) and the gradient rows per pass; among
    plans within 1% of the fastest, the one with the most rows per chunk and then the fewest
    gradient rows (speed first, then memory). Without them (logits given: no GEMMs) the rows
    are the most the cap allows, up to ``SPEED_ROWS``.
    ``half_weights``: d loss / d z_s is written in half precision into its own buffer of
    ``grad_rows`` rows, which the cap includes.
    """
    cap = chunk_memory(device_type)
    # Under torch.compile with dynamic shapes these may be symbolic; the chunk loops are Python
    # loops over them anyway, so the graph specializes on them (operator.index guards on the
    # value, where int() would keep a symbol).
    widths = None if widths is None else tuple(operator.index(w) for w in widths)
    tokens = None if tokens is None else operator.index(tokens)
    return _constant_plan(operator.index(vocab), teachers, backend, half_weights, chunk_size,
                          device_type, widths, tokens, cap)


def chunk_memory(device_type: str) -> int:
    """The cap in bytes: ``FASTKD_CHUNK_MEMORY`` (an integer > 0; unset or empty: the device
    type's default). Rows never fall below 16, so a cap under 16 rows' buffers is exceeded."""
    value = os.environ.get("FASTKD_CHUNK_MEMORY", "").strip()
    if not value:
        return DEFAULT_CHUNK_MEMORY.get(device_type, DEFAULT_CHUNK_MEMORY["cpu"])
    try:
        cap = int(value)
    except ValueError:
        raise ValueError(
            f"FASTKD_CHUNK_MEMORY must be a whole number of bytes, got {value!r}") from None
    if cap <= 0:
        raise ValueError(f"FASTKD_CHUNK_MEMORY must be > 0 bytes, got {cap}")
    return cap


# Pure Python on ints: torch.compile takes its result as a constant of the traced graph (the
# arguments are shapes and settings, which the graph's guards already fix) instead of tracing
# the cached search, which it cannot (max with a key) and need not do.
@torch.compiler.assume_constant_result
def _constant_plan(*arguments) -> ChunkPlan:
    return _plan(*arguments)


@functools.lru_cache(maxsize=256)
def _plan(vocab, teachers, backend, half_weights, chunk_size, device_type, widths, tokens, cap):
    logit_row = 4 * vocab * chunk_buffers(backend, teachers)
    grad_row = 2 * vocab if half_weights else 0

    def grad_chunk_options(rows: int) -> range:
        if not half_weights:
            return range(1, 2)
        spare = cap - rows * (logit_row + grad_row)
        return range(1, max(1, min(GRAD_CHUNKS, 1 + spare // (grad_row * rows))) + 1)

    if chunk_size is not None:
        candidates = [chunk_size]
    else:
        target = SPEED_ROWS.get(device_type, SPEED_ROWS["cpu"])
        most = max(ROW_ALIGN, min(target, cap // (logit_row + grad_row)) // ROW_ALIGN * ROW_ALIGN)
        candidates = list(range(ROW_ALIGN, most + 1, ROW_ALIGN))
    if widths is None or tokens is None:
        rows = candidates[-1]
        return ChunkPlan(rows, rows * grad_chunk_options(rows)[-1])
    machine = PLAN_MACHINES.get((device_type, 2 if half_weights else 4), PLAN_MACHINES[("cpu", 4)])
    plans = [ChunkPlan(rows, rows * chunks) for rows in candidates
             for chunks in grad_chunk_options(rows)]
    times = [predict(plan, tokens, vocab, widths[0], widths[1:], 2 if half_weights else 4,
                     machine).seconds for plan in plans]
    fastest = min(times)
    return max((plan for plan, t in zip(plans, times) if t <= 1.01 * fastest),
               key=lambda plan: (plan.rows, -plan.grad_rows))
