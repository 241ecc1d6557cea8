"""The multi-teacher row kernel: one program per token row, all K teachers at once.

Row inputs: raw student logits z_s (V) and K teacher rows z_k (K, V), read as one
(K_PAD, BLOCK_V) tile per vocabulary block. With s = z_s / T, t_k = z_k / T, q = softmax(s),
p_k = softmax(t_k), everything in fp32:

  pass 1  online, per teacher k: m_k, l_k = sum e^{t_k - m_k}, b_k = sum e^{t_k - m_k} (t_k - m_k),
          a_k = sum e^{t_k - m_k} ((t_k - m_k) - (s - m_s)); and the student's m_s, l_s (and
          l_z for CE). A block raising m_k to m_k' (m_s to m_s') rescales b_k to
          e^{m_k - m_k'} (b_k + (m_k - m_k') l_k), and a_k likewise with
          (m_k - m_k') - (m_s - m_s') in place of (m_k - m_k').
            entropy H_k = log l_k - b_k / l_k,   KL(p_k || q) = a_k / l_k - log l_k + log l_s.
          The row maxima stay apart from the log-sums (log p_k = (t_k - m_k) - log l_k, never
          t_k - LSE_k): at small T the LSEs are large, and rounding them to fp32 (or taking
          H_k as the difference LSE_k - E_p[t_k] of two large numbers) costs ~1e-3 at T = 1e-3.
          Mixing weights w = softmax_k(log pi_k - H_k / tau) ("entropy") or pi ("static").
  pass 2  the fused target P = sum_k w_k p_k per element:
            "mixture":     loss KL(P || q) = sum_j P_j (log P_j - log q_j), known only here;
            "weighted_kl": loss sum_k w_k KL(p_k || q), known after pass 1.
          Either way the gradient is d loss / d z_s = soft_weight / T (q - P) (+ hard CE), so
          pass 2 runs for the mixture loss or for the gradient, and is skipped when neither
          is needed. No per-teacher probability is stored.

Logit transforms (kernels/row_common.py): the student's by the STUDENT_TRANSFORM switch, the
teachers' (TEACHER_TRANSFORM) by K scales, caps and ratios (cap 0: scale only), applied as each
tile is loaded; the gradient q - P (+ CE) is d loss / d f_s, times f_s'(z_s) as it is stored.
"""

from __future__ import annotations

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
from fastkd.options import MultiTeacherOptions


@triton.jit
def _load_tiles(s_row, t_row, stride_k, start, V, K, inv_temperature,
                s_scale, s_cap, s_scale_over_cap, t_scales, t_caps, t_ratios,
                STUDENT_TRANSFORM: tl.constexpr, TEACHER_TRANSFORM: tl.constexpr,
                K_PAD: tl.constexpr, BLOCK_V: tl.constexpr):
    # The student's logits z = f_s(z_s) (BLOCK_V), tempered s, f_s'(z_s), and the tempered
    # teacher tile t = f_k(z_k) / T (K_PAD, BLOCK_V), teacher k's transform from its scale,
    # cap and scale / cap (K_PAD,). Teacher rows k >= K are zeros (finite, and given weight 0).
    cols = start + tl.arange(0, BLOCK_V)
    in_vocab = cols < V
    k = tl.arange(0, K_PAD)
    raw = tl.load(s_row + cols, mask=in_vocab, other=-float("inf")).to(tl.float32)
    z = model_logits(raw, in_vocab, s_scale, s_cap, s_scale_over_cap, STUDENT_TRANSFORM)
    t = tl.load(t_row + k[:, None] * stride_k + cols[None, :],
                mask=(k[:, None] < K) & in_vocab[None, :], other=-float("inf")).to(tl.float32)
    if TEACHER_TRANSFORM:
        capped = model_logits(t, in_vocab[None, :], t_scales[:, None], t_caps[:, None],
                              t_ratios[:, None], 2)  # row_common.SOFTCAP
        t = tl.where(t_caps[:, None] == 0.0, t * t_scales[:, None], capped)
    t = tl.where(k[:, None] < K, t * inv_temperature, 0.0)
    slope = model_slope(raw, s_scale, s_scale_over_cap, STUDENT_TRANSFORM)
    return cols, in_vocab, z, z * inv_temperature, t, slope


@triton.jit
def _multi_teacher_rows_kernel(
    s_ptr, t_ptr, grad_ptr, labels_ptr, priors_ptr, loss_ptr, weights_ptr,
    V, K, stride_s, stride_tk, stride_t, stride_g,
    temperature, entropy_tau, soft_weight, hard_weight, ignore_index,
    s_scale, s_cap, s_scale_over_cap, t_transforms_ptr,
    ENTROPY_WEIGHTING: tl.constexpr,
    MIXTURE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_HARD: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    STUDENT_TRANSFORM: tl.constexpr,  # 0 none, 1 scale, 2 softcap (row_common.py)
    TEACHER_TRANSFORM: tl.constexpr,  # t_transforms_ptr: (3, K) scales, caps, ratios
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    inv_temperature = 1.0 / temperature
    k = tl.arange(0, K_PAD)
    is_teacher = k < K

    label, counted = row_label(labels_ptr, row, ignore_index, HAS_LABELS)
    if TEACHER_TRANSFORM:
        t_scales = tl.load(t_transforms_ptr + k, mask=is_teacher, other=1.0)
        t_caps = tl.load(t_transforms_ptr + K + k, mask=is_teacher, other=0.0)
        t_ratios = tl.load(t_transforms_ptr + 2 * K + k, mask=is_teacher, other=0.0)
    else:  # unused
        t_scales = tl.full((K_PAD,), 1.0, tl.float32)
        t_caps = tl.zeros((K_PAD,), tl.float32)
        t_ratios = tl.zeros((K_PAD,), tl.float32)

    # ---- pass 1: per-teacher running max, sum, entropy and KL accumulators
    m_s = -float("inf")
    l_s = 0.0
    l_z = 0.0  # sum e^{z_s - T m_s}, for CE at T = 1
    m_k = tl.full((K_PAD,), -float("inf"), tl.float32)
    l_k = tl.zeros((K_PAD,), tl.float32)
    b_k = tl.zeros((K_PAD,), tl.float32)
    a_k = tl.zeros((K_PAD,), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols, in_vocab, z, s, t, _ = _load_tiles(
            s_row, t_row, stride_tk, start, V, K, inv_temperature, s_scale, s_cap,
            s_scale_over_cap, t_scales, t_caps, t_ratios, STUDENT_TRANSFORM, TEACHER_TRANSFORM,
            K_PAD, BLOCK_V)
        m_s_new = tl.maximum(m_s, tl.max(s, axis=0))
        l_s = l_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(s - m_s_new), axis=0)
        if HAS_HARD:
            l_z = raw_sum_update(l_z, z, m_s, m_s_new, temperature)
        m_k_new = tl.maximum(m_k, tl.max(t, axis=1))
        alpha = tl.exp(m_k - m_k_new)
        e = tl.exp(t - m_k_new[:, None])
        t_c = t - m_k_new[:, None]  # centered: t_k - m_k
        shift = tl.where(l_k > 0, m_k - m_k_new, 0.0)  # -inf - -inf before the first value
        b_k = alpha * (b_k + shift * l_k) + tl.sum(xlogy(e, t_c), axis=1)
        if not MIXTURE:
            shift_a = tl.where(l_k > 0, shift - (m_s - m_s_new), 0.0)
            a_k = alpha * (a_k + shift_a * l_k) + tl.sum(
                xlogy(e, t_c - (s - m_s_new)[None, :]), axis=1)
        l_k = l_k * alpha + tl.sum(e, axis=1)
        m_k = m_k_new
        m_s = m_s_new
    log_l_s = tl.log(l_s)
    log_l_k = tl.log(l_k)

    # ---- mixing weights: w = softmax_k(log pi_k - H_k / tau), or pi
    log_prior = tl.log(tl.load(priors_ptr + k, mask=is_teacher, other=1.0))
    if ENTROPY_WEIGHTING:
        entropy = log_l_k - b_k / l_k
        logit_w = tl.where(is_teacher, log_prior - entropy / entropy_tau, -float("inf"))
        w = tl.exp(logit_w - tl.max(logit_w, axis=0))
        w = w / tl.sum(w, axis=0)
    else:
        w = tl.where(is_teacher, tl.exp(log_prior), 0.0)
    tl.store(weights_ptr + row * K + k, w, mask=is_teacher)
    log_w = tl.log(w)  # -inf for padded teachers: they drop out of every log-sum below

    if HAS_HARD:  # CE = LSE(z_s) - z_s[y]; z_s[y] is read before pass 2 may overwrite it
        lse_z = m_s * temperature + tl.log(l_z)
        z_label = tl.load(s_row + label, mask=counted, other=0.0).to(tl.float32)
        cross_entropy = lse_z - model_logits(z_label, counted, s_scale, s_cap, s_scale_over_cap,
                                             STUDENT_TRANSFORM)

    # ---- pass 2: per element, log P = logsumexp_k(log w_k + t_k - LSE_k)
    divergence = tl.sum(tl.where(is_teacher, w * (a_k / l_k - log_l_k + log_l_s), 0.0), axis=0)
    if MIXTURE or COMPUTE_GRAD:
        g_row = grad_ptr + row * stride_g
        mixture_kl = 0.0
        for start in range(0, V, BLOCK_V):
            cols, in_vocab, z, s, t, slope = _load_tiles(
                s_row, t_row, stride_tk, start, V, K, inv_temperature, s_scale, s_cap,
                s_scale_over_cap, t_scales, t_caps, t_ratios, STUDENT_TRANSFORM,
                TEACHER_TRANSFORM, K_PAD, BLOCK_V)
            # log(w_k p_k), (K_PAD, BLOCK_V)
            log_wp = log_w[:, None] + ((t - m_k[:, None]) - log_l_k[:, None])
            top = tl.max(log_wp, axis=0)
            log_mix = top + tl.log(tl.sum(tl.exp(log_wp - top[None, :]), axis=0))
            mix = tl.exp(log_mix)
            log_q = (s - m_s) - log_l_s
            if MIXTURE:
                kl_terms = xlogy(mix, log_mix - log_q)
                mixture_kl += tl.sum(tl.where(in_vocab, kl_terms, 0.0), axis=0)
            if COMPUTE_GRAD:
                g = (tl.exp(log_q) - mix) * (soft_weight * inv_temperature)  # q - P
                if HAS_HARD:
                    g += hard_weight * cross_entropy_grad(z, lse_z, cols, label)
                g = chain_rule(tl.where(counted, g, 0.0), slope, STUDENT_TRANSFORM)
                tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=in_vocab)
        if MIXTURE:
            divergence = mixture_kl

    loss = soft_weight * divergence
    if HAS_HARD:
        loss += hard_weight * cross_entropy
    tl.store(loss_ptr + row, tl.where(counted, loss, 0.0))


def multi_teacher_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    options: MultiTeacherOptions,
    weights_out: torch.Tensor,
    block_v: int = 1024,
) -> torch.Tensor:
    """Launch on student logits (C, V) and teacher logits (K, C, V); returns the loss (C,).

    Writes the mixing weights into ``weights_out`` (C, K) and, when ``grad_out`` (C, V) is
    given, d loss / d z_s into it (it may be ``student_logits`` itself). Rows are unit-stride.
    """
    teachers, rows, vocab = teacher_logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=student_logits.device)
    if rows == 0:
        return loss
    k_pad = triton.next_power_of_2(teachers)
    teacher_transform = bool(options.teacher_softcaps)
    if teacher_transform:  # the transformed tile holds more registers: half the block
        block_v //= 2  # (a (4, 256) tile would spill on sm_90, tests/hopper_compile.py)
    block_v = min(max(16, block_v // k_pad), triton.next_power_of_2(vocab))
    has_hard = labels is not None and options.hard_weight > 0
    transforms = torch.tensor(  # (3, K): scales, caps, scale / cap (0 without a cap)
        [list(options.teacher_scales), list(options.teacher_softcaps),
         [a / c if c else 0.0 for a, c in zip(options.teacher_scales, options.teacher_softcaps)]]
        if teacher_transform else [[1.0]], dtype=torch.float32, device=student_logits.device)
    _multi_teacher_rows_kernel[(rows,)](
        student_logits, teacher_logits,
        grad_out if grad_out is not None else student_logits,
        labels if labels is not None else loss,
        torch.tensor(options.priors, dtype=torch.float32, device=student_logits.device),
        loss, weights_out,
        vocab, teachers, student_logits.stride(0), teacher_logits.stride(0),
        teacher_logits.stride(1), grad_out.stride(0) if grad_out is not None else 0,
        float(options.temperature), float(options.entropy_tau),
        float(options.soft_weight), float(options.hard_weight), int(options.ignore_index),
        *transform_arguments(options.student_softcap, options.student_scale), transforms,
        ENTROPY_WEIGHTING=options.weighting == "entropy",
        MIXTURE=options.fusion == "mixture",
        HAS_LABELS=labels is not None,
        HAS_HARD=has_hard,
        COMPUTE_GRAD=grad_out is not None,
        K_PAD=k_pad,
        BLOCK_V=block_v,
        STUDENT_TRANSFORM=transform_id(options.student_softcap, options.student_scale),
        TEACHER_TRANSFORM=teacher_transform,
        num_warps=8,
    )
    return loss
