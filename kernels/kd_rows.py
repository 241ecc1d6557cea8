"""The fused vocabulary-KD row kernel: one program per token row, looping over the vocabulary.

For one row with raw student logits z_s and teacher logits z_t (V each), tempered
s = z_s / T, t = z_t / T, q = softmax(s), p = softmax(t), it computes in fp32:

  pass 1  online log-sum-exps of s and t (and of z_s for the hard CE term); for "kl" and
          "reverse_kl" also the divergence, in the same pass (docs/design.md section 3):
            a = sum_j e^{t_j - m_t} (t_j - s_j)      KL(p||q) = a / l_t - LSE_t + LSE_s
  pass 2  "jsd" only: with M = beta p + (1 - beta) q and x = log(beta p / ((1 - beta) q)),
          log q - log M = -log(1 - beta) - softplus(x), log p - log M = -log beta - softplus(-x):
            JSD = H(beta) - beta E_p[softplus(-x)] - (1 - beta) E_q[softplus(x)]
          (H(beta) the binary entropy); written so, no constant log(1 - beta) cancels in the
          gradient (1 - beta) q_j (E_q[softplus(x)] - softplus(x_j)).
  pass 3  the gradient d loss / d z_s, written in place of (or beside) the student logits.

The gradient of any function of softmax(z_s) sums to zero over the row. At the student's top
logit j* the reverse KL and JSD formulas cancel catastrophically when q is near one-hot
(q_j* (r_j* - E_q[r]) with r_j* ~ E_q[r]), so there g_j* is written as -sum_{j != j*} g_j
instead, which keeps the gradient accurate in fp32 even where it is tiny. Forward KL's q - p
has no such cancelling constant (the rewrite would only add the rounding of the whole row), so
it is written directly.

The row max and the log-sum are kept apart: log q_j = (s_j - m_s) - log l_s, never s_j - LSE_s
with LSE_s rounded to fp32 (at small T or large logits LSE_s is large, and its rounding would
shift every log-probability). beta's constants (1 - beta, log(beta / (1 - beta)), H(beta)) are
computed on the host in float64: in fp32, 1 - beta and log(1 - beta) lose beta near 0 or 1.

No softmax, log-softmax or probability tensor is ever stored; ignored tokens get loss 0 and a
zero gradient row.

A logit transform (STUDENT_TRANSFORM / TEACHER_TRANSFORM, kernels/row_common.py) replaces z by
the model's logits f(z) as each block is loaded: every formula above then reads f(z), and the
gradient pass multiplies d loss / d f by f'(z) as it stores, the top entry's -(sum of the others)
taken over d loss / d f first (rows of d loss / d f sum to zero, those of d loss / d z do not).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastkd.kernels.row_common import (
    chain_rule,
    cross_entropy_grad,
    model_logits,
    model_slope,
    raw_sum_update,
    row_label,
    transform_arguments,
    transform_id,
    xlogy,
)
from fastkd.options import KDOptions

DIVERGENCE_IDS = {"kl": 0, "reverse_kl": 1, "jsd": 2}


@triton.jit
def _softplus(x):
    # log(1 + e^x) = max(x, 0) + log1p(e^{-|x|}); log1p(y) = log(w) y / (w - 1), w = 1 + y
    # (exact to rounding, no libdevice needed).
    y = tl.exp(-tl.abs(x))
    w = 1.0 + y
    log1p_y = tl.where(w == 1.0, y, tl.log(w) * y / (w - 1.0))
    return tl.maximum(x, 0.0) + log1p_y


@triton.jit
def _jsd_x(s, t, m_s, m_t, log_l_s, log_l_t, log_odds_beta):
    # x = log(beta p / ((1 - beta) q)) = log(beta / (1 - beta)) + log p - log q, with
    # log p = (t - m_t) - log l_t and log q = (s - m_s) - log l_s
    return log_odds_beta + (((t - m_t) - log_l_t) - ((s - m_s) - log_l_s))


@triton.jit
def _load_block(s_row, t_row, start, V, inv_temperature,
                s_scale, s_cap, s_scale_over_cap, t_scale, t_cap, t_scale_over_cap,
                STUDENT_TRANSFORM: tl.constexpr, TEACHER_TRANSFORM: tl.constexpr,
                BLOCK_V: tl.constexpr):
    # One vocabulary block, in fp32: the student's logits z = f_s(z_s) (raw z_s without a
    # transform), tempered s = z / T and t = f_t(z_t) / T, and f_s'(z_s) for the chain rule.
    cols = start + tl.arange(0, BLOCK_V)
    in_vocab = cols < V
    raw = tl.load(s_row + cols, mask=in_vocab, other=-float("inf")).to(tl.float32)
    t = tl.load(t_row + cols, mask=in_vocab, other=-float("inf")).to(tl.float32)
    z = model_logits(raw, in_vocab, s_scale, s_cap, s_scale_over_cap, STUDENT_TRANSFORM)
    t = model_logits(t, in_vocab, t_scale, t_cap, t_scale_over_cap, TEACHER_TRANSFORM)
    slope = model_slope(raw, s_scale, s_scale_over_cap, STUDENT_TRANSFORM)
    return cols, in_vocab, z, z * inv_temperature, t * inv_temperature, slope


@triton.jit
def _kd_rows_kernel(
    s_ptr, t_ptr, grad_ptr, labels_ptr, loss_ptr,
    V, stride_s, stride_t, stride_g,
    temperature, beta, one_minus_beta, log_odds_beta, binary_entropy,
    soft_weight, hard_weight, ignore_index,
    s_scale, s_cap, s_scale_over_cap, t_scale, t_cap, t_scale_over_cap,
    DIVERGENCE: tl.constexpr,  # 0 kl, 1 reverse_kl, 2 jsd
    HAS_LABELS: tl.constexpr,
    HAS_HARD: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    STUDENT_TRANSFORM: tl.constexpr,  # 0 none, 1 scale, 2 softcap (row_common.py)
    TEACHER_TRANSFORM: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    inv_temperature = 1.0 / temperature

    label, counted = row_label(labels_ptr, row, ignore_index, HAS_LABELS)

    # ---- pass 1: running maxima m and sums l = sum e^{x - m}; a block raising m to m'
    # rescales every running sum by e^{m - m'}.
    m_s = -float("inf")
    m_t = -float("inf")
    l_s = 0.0
    l_t = 0.0
    l_z = 0.0  # sum e^{z_s - T m_s}: the untempered student, for CE at T = 1
    a = 0.0  # kl: sum e^{t - m_t}(t - s); reverse_kl: sum e^{s - m_s}(s - t)
    j_top = 0  # index of the largest student logit
    for start in range(0, V, BLOCK_V):
        cols, in_vocab, z, s, t, _ = _load_block(
            s_row, t_row, start, V, inv_temperature, s_scale, s_cap, s_scale_over_cap, t_scale,
            t_cap, t_scale_over_cap, STUDENT_TRANSFORM, TEACHER_TRANSFORM, BLOCK_V)
        block_top = tl.max(s, axis=0)
        j_top = tl.where(block_top > m_s, start + tl.argmax(s, axis=0), j_top)
        m_s_new = tl.maximum(m_s, block_top)
        m_t_new = tl.maximum(m_t, tl.max(t, axis=0))
        alpha_s = tl.exp(m_s - m_s_new)
        alpha_t = tl.exp(m_t - m_t_new)
        e_s = tl.exp(s - m_s_new)
        e_t = tl.exp(t - m_t_new)
        l_s = l_s * alpha_s + tl.sum(e_s, axis=0)
        l_t = l_t * alpha_t + tl.sum(e_t, axis=0)
        if HAS_HARD:
            l_z = raw_sum_update(l_z, z, m_s, m_s_new, temperature)
        if DIVERGENCE == 0:
            a = a * alpha_t + tl.sum(xlogy(e_t, t - s), axis=0)
        if DIVERGENCE == 1:
            a = a * alpha_s + tl.sum(xlogy(e_s, s - t), axis=0)
        m_s = m_s_new
        m_t = m_t_new
    log_l_s = tl.log(l_s)
    log_l_t = tl.log(l_t)

    # LSE_t - LSE_s = (m_t - m_s) + (log l_t - log l_s), the maxima apart from the log-sums
    if DIVERGENCE == 0:
        divergence = a / l_t - (m_t - m_s) - (log_l_t - log_l_s)  # KL(p || q)
    elif DIVERGENCE == 1:
        divergence = a / l_s - (m_s - m_t) - (log_l_s - log_l_t)  # KL(q || p)
    else:
        # ---- pass 2 (jsd): E_q[softplus(x)] and E_p[softplus(-x)]
        eq_sp = 0.0
        ep_sp = 0.0
        for start in range(0, V, BLOCK_V):
            cols, in_vocab, z, s, t, _ = _load_block(
                s_row, t_row, start, V, inv_temperature, s_scale, s_cap, s_scale_over_cap, t_scale,
                t_cap, t_scale_over_cap, STUDENT_TRANSFORM, TEACHER_TRANSFORM, BLOCK_V)
            x = _jsd_x(s, t, m_s, m_t, log_l_s, log_l_t, log_odds_beta)
            q = tl.exp((s - m_s) - log_l_s)  # 0 past the end
            eq_sp += tl.sum(xlogy(q, _softplus(x)), axis=0)
            ep_sp += tl.sum(xlogy(tl.exp((t - m_t) - log_l_t), _softplus(-x)), axis=0)
        divergence = binary_entropy - beta * ep_sp - one_minus_beta * eq_sp

    loss = soft_weight * divergence
    if HAS_HARD:
        lse_z = m_s * temperature + tl.log(l_z)
        z_label = model_logits(tl.load(s_row + label, mask=counted, other=0.0).to(tl.float32),
                               counted, s_scale, s_cap, s_scale_over_cap, STUDENT_TRANSFORM)
        loss += hard_weight * (lse_z - z_label)  # CE = LSE(z_s) - z_s[y]
    tl.store(loss_ptr + row, tl.where(counted, loss, 0.0))

    if COMPUTE_GRAD:
        # ---- last pass: d loss / d z_s
        #      = soft_weight / T * d div / d s + hard_weight * (softmax(z_s) - onehot(y))
        g_row = grad_ptr + row * stride_g
        g_others = 0.0  # sum of g_j over j != j_top
        slope_top = 1.0  # f_s' at the top logit, read before the row (g may alias it) is written
        if STUDENT_TRANSFORM != 0:
            slope_top = model_slope(tl.load(s_row + j_top).to(tl.float32), s_scale,
                                    s_scale_over_cap, STUDENT_TRANSFORM)
        for start in range(0, V, BLOCK_V):
            cols, in_vocab, z, s, t, slope = _load_block(
                s_row, t_row, start, V, inv_temperature, s_scale, s_cap, s_scale_over_cap, t_scale,
                t_cap, t_scale_over_cap, STUDENT_TRANSFORM, TEACHER_TRANSFORM, BLOCK_V)
            q = tl.exp((s - m_s) - log_l_s)
            if DIVERGENCE == 0:
                g = q - tl.exp((t - m_t) - log_l_t)  # kl: q - p
            elif DIVERGENCE == 1:
                # reverse: q (log q - log p - KL(q||p)) = q ((s - t) - E_q[s - t])
                g = xlogy(q, (s - t) - a / l_s)
            else:
                # jsd: (1 - beta) q (log(q / M) - KL(q || M)) = (1 - beta) q (E_q[sp(x)] - sp(x))
                x = _jsd_x(s, t, m_s, m_t, log_l_s, log_l_t, log_odds_beta)
                g = one_minus_beta * xlogy(q, eq_sp - _softplus(x))
            g = g * (soft_weight * inv_temperature)
            if HAS_HARD:
                g += hard_weight * cross_entropy_grad(z, lse_z, cols, label)
            g = tl.where(counted, g, 0.0)  # d loss / d f; times f'(z) as it is stored
            if DIVERGENCE == 0:  # q - p: written as it is
                tl.store(g_row + cols, chain_rule(g, slope, STUDENT_TRANSFORM).to(
                    grad_ptr.dtype.element_ty), mask=in_vocab)
            else:
                not_top = in_vocab & (cols != j_top)
                g_others += tl.sum(tl.where(not_top, g, 0.0), axis=0)
                tl.store(g_row + cols, chain_rule(g, slope, STUDENT_TRANSFORM).to(
                    grad_ptr.dtype.element_ty), mask=not_top)
        if DIVERGENCE != 0:  # rows of d loss / d f sum to 0
            g_top = chain_rule(-g_others, slope_top, STUDENT_TRANSFORM)
            tl.store(g_row + j_top, g_top.to(grad_ptr.dtype.element_ty))


def _beta_constants(beta: float) -> tuple[float, float, float, float]:
    """beta, 1 - beta, log(beta / (1 - beta)) and the binary entropy H(beta), in float64."""
    if not 0 < beta < 1:  # only "jsd" reads them, and it has 0 < beta < 1
        return beta, 1.0 - beta, 0.0, 0.0
    one_minus = 1.0 - beta
    entropy = -beta * math.log(beta) - one_minus * math.log1p(-beta)
    return beta, one_minus, math.log(beta) - math.log1p(-beta), entropy


def kd_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    options: KDOptions,
    block_v: int = 2048,
) -> torch.Tensor:
    """Launch the row kernel on logits (C, V); returns the per-token loss (C,) in fp32.

    ``grad_out`` (C, V), when given, receives d loss / d z_s; it may be ``student_logits``
    itself (each element is read before it is overwritten). Rows must be unit-stride.
    """
    rows, vocab = student_logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=student_logits.device)
    if rows == 0:
        return loss
    block_v = min(block_v, triton.next_power_of_2(vocab))
    has_hard = labels is not None and options.hard_weight > 0
    _kd_rows_kernel[(rows,)](
        student_logits, teacher_logits,
        grad_out if grad_out is not None else student_logits,
        labels if labels is not None else loss,
        loss,
        vocab, student_logits.stride(0), teacher_logits.stride(0),
        grad_out.stride(0) if grad_out is not None else 0,
        float(options.temperature), *_beta_constants(options.beta),
        float(options.soft_weight), float(options.hard_weight), int(options.ignore_index),
        *transform_arguments(options.student_softcap, options.student_scale),
        *transform_arguments(options.teacher_softcap, options.teacher_scale),
        DIVERGENCE=DIVERGENCE_IDS[options.divergence],
        HAS_LABELS=labels is not None,
        HAS_HARD=has_hard,
        COMPUTE_GRAD=grad_out is not None,
        BLOCK_V=block_v,
        STUDENT_TRANSFORM=transform_id(options.student_softcap, options.student_scale),
        TEACHER_TRANSFORM=transform_id(options.teacher_softcap, options.teacher_scale),
        num_warps=8 if block_v >= 2048 else 4,
    )
    return loss
