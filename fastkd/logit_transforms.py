"""Soft-capped and scaled logits: the model's last step, applied inside the row ops.

Some models emit transformed logits: with a = scale and c = softcap (docs/design.md)::

    f(z) = c tanh(a z / c)        (Gemma 2 / 3: c = final_logit_softcapping, a = 1)
    f(z) = a z                    (no cap: Cohere a = logit_scale, Granite a = 1 / logits_scaling)

The row ops read the raw lm_head logits z and apply f per element, never materializing f(z):
s = f(z_s) / T, t = f(z_t) / T, the hard CE on f(z_s), and d loss / d z = d loss / d f * f'(z)
with f'(z) = a sech^2(a z / c).

Numerics, with x = a z / c and e = e^{-2|x|}:
    tanh(x)    = sign(x) (1 - e) / (1 + e),  1 - e = -expm1(-2|x|) (full relative precision at
                 small |x|, where 1 - e would cancel)
    sech^2(x)  = 4 e / (1 + e)^2   (never 1 - tanh^2(x): that is 0 in fp32 once |x| > 9, while
                 sech^2(10) = 8.2e-9; at |x| > 44 e underflows and f' is 0 to within 1e-38)
    |x| < SMALL_X[dtype]: f(z) = a z exactly (tanh(x) = x (1 - x^2 / 3 + ...), and x^2 / 3 is
                 below half an ulp there), so a huge cap equals no cap, and a ratio a / c that
                 underflows (or a denormal x flushed to zero) cannot zero the logits.
This module holds the public argument checks and the torch backend's formula; the Triton
kernels (kernels/row_common.py) and the C++ / CUDA row ops (csrc/row_math.h) write the same one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fastkd._checks import check_positive, check_real

# |x| below which tanh(x) = x to within half an ulp of the dtype: x^2 / 3 < 2^-24 (fp32) or
# 2^-53 (fp64). bf16 and fp16 logits are transformed in fp32.
SMALL_X = {torch.float32: 2.0**-12, torch.float64: 2.0**-27}


def check_softcap(name: str, value: object) -> float:
    """A softcap: None (no cap, 0.0 for the row ops) or a finite number > 0."""
    if value is None:
        return 0.0
    number = check_real(name, value)  # a TypeError for bools, tensors, strings
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0 or None, got {value!r}")
    return number


def check_logit_scale(name: str, value: object) -> float:
    """A logit scale: a finite number > 0 (1.0: no scaling)."""
    return check_positive(name, value)


def check_teacher_transforms(
    softcap: object, scale: object, teachers: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """multi_teacher_kd_loss's teacher_softcap and teacher_logit_scale: one value for every
    teacher or a sequence of K; returns K softcaps (0.0 = none) and K scales, or two empty
    tuples when no teacher is transformed."""
    caps = tuple(check_softcap(f"teacher_softcap[{k}]", v)
                 for k, v in enumerate(_per_teacher("teacher_softcap", softcap, teachers)))
    scales = tuple(check_logit_scale(f"teacher_logit_scale[{k}]", v)
                   for k, v in enumerate(_per_teacher("teacher_logit_scale", scale, teachers)))
    if all(c == 0.0 for c in caps) and all(a == 1.0 for a in scales):
        return (), ()
    return caps, scales


def _per_teacher(name: str, value: object, teachers: int) -> list:
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a number or a sequence of {teachers} numbers (Python "
                        "floats), got a Tensor")
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != teachers:
            raise ValueError(f"{name} has {len(value)} values for {teachers} teachers: give "
                             "one value for all of them or one per teacher")
        return list(value)
    return [value] * teachers


def transformed_logits(
    z: torch.Tensor, softcap: float, scale: float, want_slope: bool
) -> tuple[torch.Tensor, torch.Tensor | float | None]:
    """f(z) of logits z (C, V) fp32 or fp64, and f'(z): a tensor (C, V) with a cap, the float
    ``scale`` without one; None without ``want_slope`` or for the identity (f(z) is z itself)."""
    if softcap == 0.0:
        if scale == 1.0:
            return z, None
        return z * scale, (scale if want_slope else None)
    x = z * (scale / softcap)
    minus_two_abs = x.abs().mul_(-2.0)
    e = minus_two_abs.exp()
    one_plus_e = e + 1.0
    capped = torch.copysign(torch.expm1(minus_two_abs).neg_().div_(one_plus_e).mul_(softcap), x)
    small = x.abs() < SMALL_X[z.dtype]
    f = torch.where(small, z * scale, capped)
    slope = None
    if want_slope:  # a sech^2(x) = 4 a e / (1 + e)^2
        slope = e.mul_(4.0 * scale).div_(one_plus_e.square_())
    return f, slope


def transform_options(
    student_softcap: object = None,
    student_logit_scale: object = 1.0,
    teacher_softcap: object = None,
    teacher_logit_scale: object = 1.0,
) -> dict[str, float]:
    """The checked public keywords as KDOptions fields (softcap None -> 0.0)."""
    return dict(student_softcap=check_softcap("student_softcap", student_softcap),
                student_scale=check_logit_scale("student_logit_scale", student_logit_scale),
                teacher_softcap=check_softcap("teacher_softcap", teacher_softcap),
                teacher_scale=check_logit_scale("teacher_logit_scale", teacher_logit_scale))
