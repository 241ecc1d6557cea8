"""Triton helpers shared by the vocabulary row kernels (kd_rows, multi_teacher_rows)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def xlogy(w, x):
    # w * x with 0 * anything = 0 (a probability that underflowed); NaN weights still propagate.
    return tl.where(w == 0.0, 0.0, w * x)


@triton.jit
def row_label(labels_ptr, row, ignore_index, HAS_LABELS: tl.constexpr):
    # The row's label and whether the row counts (label != ignore_index; every row without labels).
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        counted = label != ignore_index
    else:
        label = row * 0 - 1
        counted = row >= 0
    return label, counted


@triton.jit
def raw_sum_update(l_z, z, m_s, m_s_new, temperature):
    # Running sum of e^{z - T m_s} for the untempered LSE(z_s) of the hard CE term: T m_s is the
    # running max of z (m_s that of s = z / T), so a new max rescales by e^{T (m_s - m_s')}.
    return l_z * tl.exp((m_s - m_s_new) * temperature) + tl.sum(
        tl.exp(z - m_s_new * temperature), axis=0
    )


@triton.jit
def cross_entropy_grad(z, lse_z, cols, label):
    # d CE / d z_s = softmax(z_s) - onehot(label)
    return tl.exp(z - lse_z) - tl.where(cols == label, 1.0, 0.0)


@triton.jit
def store_parts(parts_row, divergence, cross_entropy, counted):
    # The row's unweighted (divergence, CE) into its (2,) entry of parts (C, 2); 0 at ignored rows.
    tl.store(parts_row, tl.where(counted, divergence, 0.0))
    tl.store(parts_row + 1, tl.where(counted, cross_entropy, 0.0))


def parts_buffer(parts_out: torch.Tensor | None, loss: torch.Tensor) -> torch.Tensor:
    """The pointer argument of parts: ``parts_out``, or any fp32 tensor when there is none."""
    return parts_out if parts_out is not None else loss
