"""Triton helpers shared by the vocabulary row kernels (kd_rows, multi_teacher_rows, sparse)."""

from __future__ import annotations

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


# The model's logit transform f (fastkd/logit_transforms.py, docs/design.md), as a constexpr
# switch: TRANSFORM 0 none, 1 scale (f(z) = a z), 2 softcap (f(z) = c tanh(a z / c)).
NO_TRANSFORM, SCALE, SOFTCAP = 0, 1, 2
SMALL_X = tl.constexpr(2.0**-12)  # |x| below which tanh(x) = x to within half an fp32 ulp


@triton.jit
def _minus_expm1(y):
    # -expm1(y) = 1 - e^y for y <= 0 at full relative precision (Triton has no expm1): Kahan's
    # (1 - u) y / log(u) with u = e^y where 1 - u would cancel (u > 1/2), 1 - u elsewhere.
    u = tl.exp(y)
    near_one = tl.where(u == 1.0, -y, (1.0 - u) * (y / tl.log(u)))
    return tl.where(u > 0.5, near_one, 1.0 - u), u


@triton.jit
def model_logits(z, in_vocab, scale, softcap, scale_over_cap, TRANSFORM: tl.constexpr):
    # f(z) of raw fp32 logits z; lanes outside the vocabulary (-inf) stay -inf. With
    # x = a z / c and u = e^{-2|x|}: tanh(x) = sign(x) (1 - u) / (1 + u), and f(z) = a z at
    # |x| < SMALL_X (so an underflowing a / c or a flushed denormal x cannot zero it).
    f = z
    if TRANSFORM == 1:
        f = z * scale
    if TRANSFORM == 2:
        x = z * scale_over_cap
        one_minus_u, u = _minus_expm1(-2.0 * tl.abs(x))
        capped = softcap * (one_minus_u / (1.0 + u))
        capped = tl.where(x < 0.0, -capped, capped)
        f = tl.where(tl.abs(x) < SMALL_X, z * scale, capped)
        f = tl.where(in_vocab, f, -float("inf"))
    return f


@triton.jit
def model_slope(z, scale, scale_over_cap, TRANSFORM: tl.constexpr):
    # f'(z): 1, a, or a sech^2(x) = 4 a u / (1 + u)^2 (never 1 - tanh^2, 0 in fp32 past |x| = 9)
    slope = scale
    if TRANSFORM == 2:
        u = tl.exp(-2.0 * tl.abs(z * scale_over_cap))
        slope = (4.0 * scale) * u / ((1.0 + u) * (1.0 + u))
    return slope


@triton.jit
def chain_rule(g, slope, TRANSFORM: tl.constexpr):
    # d loss / d z = d loss / d f * f'(z); the identity costs nothing
    if TRANSFORM != 0:
        g = g * slope
    return g


def transform_id(softcap: float, scale: float) -> int:
    """The TRANSFORM constexpr of a (softcap, scale) pair (softcap 0.0: none)."""
    if softcap != 0.0:
        return SOFTCAP
    return NO_TRANSFORM if scale == 1.0 else SCALE


def transform_arguments(softcap: float, scale: float) -> tuple[float, float, float]:
    """The kernels' (scale, softcap, scale / softcap) scalars, the ratio in float64."""
    return float(scale), float(softcap), float(scale / softcap) if softcap else 0.0
