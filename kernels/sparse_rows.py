"""The sparse (top-k) KD row kernel: one program per token row, looping over the vocabulary.

For one row with raw student logits z_s (V), tempered s = z_s / T, q = softmax(s), and a
sparse teacher given by k distinct ids S with its bucket log-probabilities log p_i (i in S) and
log p_tail (computed on the host in float64 by ``fastkd.rowops.sparse_teacher_log_probs``, O(k)
per row), it computes in fp32 (docs/sparse.md):

  pass 1  over V: running max and sum of s (LSE_s), of s off S (LSE_off: its own max, so a
          tail far below the top never underflows), of z_s (hard CE); the top student logit.
          Membership of S is one bit per id (a (C, ceil(V / 32)) int32 mask from the host).
  pass S  over the k ids: the divergence over the k + 1 buckets ("bucket": log q_i =
          s_i - LSE_s, log q_tail = LSE_off - LSE_s) or over the k renormalized ids
          ("renormalize": log q_i = s_i - LSE_S(s), an online LSE over the ids first).
  pass 2  d loss / d z_s off S, written block by block (support columns masked out):
            bucket kl        q_j - p_tail exp(s_j - LSE_off)          (q_j - p~_j)
            bucket reverse   q_j (log q_tail - log p_tail - KL(q||p))
            renormalize      0
          then on the ids (stored through the id pointers; no address is written twice):
            kl q_i - p_i, reverse q_i (log q_i - log p_i - KL), with the bucket's or the
            renormalized q.
          Plus hard_weight (softmax(z_s) - onehot(y)) everywhere, times 0 at ignored rows.
          Reverse KL writes the entry of the student's mode (the top logit; for "renormalize"
          the top logit on S) last, as minus the sum of all the others (rows sum to zero), as
          the dense kernel does (kernels/kd_rows.py).

A student logit transform (STUDENT_TRANSFORM, kernels/row_common.py) replaces z_s by f(z_s) as
it is loaded; the gradient above is d loss / d f, multiplied by f'(z_s) as it is stored, after
the reverse KL's top entry is taken as minus the sum of the others' d loss / d f. The teacher's
stored logits are already its emitted ones.
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
from fastkd.options import KDOptions
from fastkd.rowops import sparse_teacher_log_probs


@triton.jit
def _in_support(bits_row, cols, in_vocab):
    # bit (j mod 32) of word j / 32: 1 where column j is one of the row's ids
    word = tl.load(bits_row + (cols >> 5), mask=in_vocab, other=0)
    return ((word >> (cols & 31)) & 1) == 1


@triton.jit
def _load_ids(ids_row, s_row, logp_row, start, k, inv_temperature, s_scale, s_cap,
              s_scale_over_cap, STUDENT_TRANSFORM: tl.constexpr, BLOCK_K: tl.constexpr):
    # One block of the row's ids: the ids, the student's logits z_i = f(z_s) there, s_i, log p_i
    # and f'(z_s) at the ids.
    idx = start + tl.arange(0, BLOCK_K)
    valid = idx < k
    ids = tl.load(ids_row + idx, mask=valid, other=0)
    raw = tl.load(s_row + ids, mask=valid, other=0.0).to(tl.float32)
    z = model_logits(raw, valid, s_scale, s_cap, s_scale_over_cap, STUDENT_TRANSFORM)
    log_p = tl.load(logp_row + idx, mask=valid, other=-float("inf"))
    slope = model_slope(raw, s_scale, s_scale_over_cap, STUDENT_TRANSFORM)
    return valid, ids, z, z * inv_temperature, log_p, slope


@triton.jit
def _load_student(s_row, cols, in_vocab, s_scale, s_cap, s_scale_over_cap,
                  STUDENT_TRANSFORM: tl.constexpr):
    # The student's logits f(z_s) of one vocabulary block, and f'(z_s).
    raw = tl.load(s_row + cols, mask=in_vocab, other=-float("inf")).to(tl.float32)
    return (model_logits(raw, in_vocab, s_scale, s_cap, s_scale_over_cap, STUDENT_TRANSFORM),
            model_slope(raw, s_scale, s_scale_over_cap, STUDENT_TRANSFORM))


@triton.jit
def _sparse_rows_kernel(
    s_ptr, bits_ptr, ids_ptr, logp_ptr, log_tail_ptr, grad_ptr, labels_ptr, loss_ptr,
    V, k, stride_s, stride_bits, stride_ids, stride_logp, stride_g,
    temperature, soft_weight, hard_weight, ignore_index,
    s_scale, s_cap, s_scale_over_cap,
    BUCKET: tl.constexpr,  # tail="bucket" (else "renormalize")
    REVERSE: tl.constexpr,  # divergence="reverse_kl" (else "kl")
    HAS_LABELS: tl.constexpr,
    HAS_HARD: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STUDENT_TRANSFORM: tl.constexpr,  # 0 none, 1 scale, 2 softcap (row_common.py)
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    bits_row = bits_ptr + row * stride_bits
    ids_row = ids_ptr + row * stride_ids
    logp_row = logp_ptr + row * stride_logp
    inv_temperature = 1.0 / temperature
    label, counted = row_label(labels_ptr, row, ignore_index, HAS_LABELS)
    log_tail = tl.load(log_tail_ptr + row)

    # ---- pass 1 over V
    m_s = -float("inf")
    l_s = 0.0
    m_off = -float("inf")
    l_off = 0.0
    l_z = 0.0
    j_top = 0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_vocab = cols < V
        z, _ = _load_student(s_row, cols, in_vocab, s_scale, s_cap, s_scale_over_cap,
                             STUDENT_TRANSFORM)
        s = z * inv_temperature
        block_top = tl.max(s, axis=0)
        j_top = tl.where(block_top > m_s, start + tl.argmax(s, axis=0), j_top)
        m_s_new = tl.maximum(m_s, block_top)
        l_s = l_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(s - m_s_new), axis=0)
        if HAS_HARD:
            l_z = raw_sum_update(l_z, z, m_s, m_s_new, temperature)
        m_s = m_s_new
        if BUCKET:
            s_off = tl.where(_in_support(bits_row, cols, in_vocab), -float("inf"), s)
            m_off_new = tl.maximum(m_off, tl.max(s_off, axis=0))
            # an all -inf start (no off-support id yet) must not make exp(-inf + inf) = NaN
            safe = tl.where(m_off_new == -float("inf"), 0.0, m_off_new)
            l_off = l_off * tl.exp(m_off - safe) + tl.sum(tl.exp(s_off - safe), axis=0)
            m_off = m_off_new
    log_l_s = tl.log(l_s)
    has_tail = l_off > 0.0  # some id is off S ("bucket"); k = V leaves no tail bucket
    log_l_off = tl.log(l_off)

    # ---- pass S over the ids: the divergence D
    if BUCKET:
        shift = m_s + log_l_s  # log q_i = s_i - shift (the maxima apart in the tail term)
        log_q_tail = (m_off - m_s) + (log_l_off - log_l_s)
    else:
        m_r = -float("inf")
        l_r = 0.0
        for start in range(0, k, BLOCK_K):
            valid, ids, z_i, s_i, log_p, _ = _load_ids(
                ids_row, s_row, logp_row, start, k, inv_temperature, s_scale, s_cap,
                s_scale_over_cap, STUDENT_TRANSFORM, BLOCK_K)
            s_i = tl.where(valid, s_i, -float("inf"))
            block_top = tl.max(s_i, axis=0)
            best = tl.sum(tl.where(tl.arange(0, BLOCK_K) == tl.argmax(s_i, axis=0), ids, 0),
                          axis=0)
            j_top = tl.where(block_top > m_r, best.to(tl.int32), j_top)  # the mode of q on S
            m_r_new = tl.maximum(m_r, block_top)
            l_r = l_r * tl.exp(m_r - m_r_new) + tl.sum(tl.exp(s_i - m_r_new), axis=0)
            m_r = m_r_new
        shift = m_r + tl.log(l_r)
        log_q_tail = -float("inf")
    divergence = 0.0
    for start in range(0, k, BLOCK_K):
        valid, ids, z_i, s_i, log_p, _ = _load_ids(
            ids_row, s_row, logp_row, start, k, inv_temperature, s_scale, s_cap,
            s_scale_over_cap, STUDENT_TRANSFORM, BLOCK_K)
        log_q = s_i - shift
        if REVERSE:
            divergence += tl.sum(xlogy(tl.where(valid, tl.exp(log_q), 0.0), log_q - log_p),
                                 axis=0)
        else:
            divergence += tl.sum(xlogy(tl.exp(log_p), log_p - log_q), axis=0)
    if BUCKET:
        if REVERSE:
            tail_term = xlogy(tl.exp(log_q_tail), log_q_tail - log_tail)
        else:
            tail_term = xlogy(tl.exp(log_tail), log_tail - log_q_tail)
        divergence += tl.where(has_tail, tail_term, 0.0)

    loss = soft_weight * divergence
    if HAS_HARD:
        lse_z = m_s * temperature + tl.log(l_z)
        z_label = model_logits(tl.load(s_row + label, mask=counted, other=0.0).to(tl.float32),
                               counted, s_scale, s_cap, s_scale_over_cap, STUDENT_TRANSFORM)
        loss += hard_weight * (lse_z - z_label)
    tl.store(loss_ptr + row, tl.where(counted, loss, 0.0))

    if COMPUTE_GRAD:
        g_row = grad_ptr + row * stride_g
        scale = soft_weight * inv_temperature
        g_others = 0.0  # reverse: the sum of every entry but the top student logit's (d / d f)
        slope_top = 1.0  # f' at the top logit, read before the row (g may alias it) is written
        if STUDENT_TRANSFORM != 0:
            slope_top = model_slope(tl.load(s_row + j_top).to(tl.float32), s_scale,
                                    s_scale_over_cap, STUDENT_TRANSFORM)
        # ---- pass 2 over V: the entries off S
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_vocab = cols < V
            z, slope = _load_student(s_row, cols, in_vocab, s_scale, s_cap, s_scale_over_cap,
                                     STUDENT_TRANSFORM)
            s = z * inv_temperature
            off = in_vocab & (~_in_support(bits_row, cols, in_vocab))
            if BUCKET:
                q = tl.exp((s - m_s) - log_l_s)
                if REVERSE:
                    g = xlogy(q, log_q_tail - log_tail - divergence)
                else:
                    g = q - tl.exp(log_tail + (s - m_off) - log_l_off)
                g = g * scale
            else:
                g = tl.zeros([BLOCK_V], dtype=tl.float32)
            if HAS_HARD:
                g += hard_weight * cross_entropy_grad(z, lse_z, cols, label)
            g = tl.where(counted, g, 0.0)
            if REVERSE:
                off = off & (cols != j_top)
                g_others += tl.sum(tl.where(off, g, 0.0), axis=0)
            tl.store(g_row + cols, chain_rule(g, slope, STUDENT_TRANSFORM).to(
                grad_ptr.dtype.element_ty), mask=off)
        # ---- the entries on S, through the ids
        for start in range(0, k, BLOCK_K):
            valid, ids, z_i, s_i, log_p, slope = _load_ids(
                ids_row, s_row, logp_row, start, k, inv_temperature, s_scale, s_cap,
                s_scale_over_cap, STUDENT_TRANSFORM, BLOCK_K)
            log_q = s_i - shift
            q = tl.exp(log_q)
            if REVERSE:
                g = xlogy(q, log_q - log_p - divergence)
            else:
                g = q - tl.exp(log_p)
            g = g * scale
            if HAS_HARD:
                g += hard_weight * cross_entropy_grad(z_i, lse_z, ids, label)
            g = tl.where(counted, g, 0.0)
            if REVERSE:
                valid = valid & (ids != j_top)
                g_others += tl.sum(tl.where(valid, g, 0.0), axis=0)
            tl.store(g_row + ids, chain_rule(g, slope, STUDENT_TRANSFORM).to(
                grad_ptr.dtype.element_ty), mask=valid)
        if REVERSE:
            g_top = chain_rule(-g_others, slope_top, STUDENT_TRANSFORM)
            tl.store(g_row + j_top, g_top.to(grad_ptr.dtype.element_ty))


def support_bits(teacher_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """(C, ceil(V / 32)) int32: bit j mod 32 of word j / 32 set where j is one of the row's ids.

    The ids of a row are distinct, so adding their bits into a word is OR-ing them (int32
    wraps: bit 31 is the sign bit).
    """
    bits = torch.zeros(teacher_ids.shape[0], (vocab + 31) // 32, dtype=torch.int32,
                       device=teacher_ids.device)
    one = torch.ones((), dtype=torch.int32, device=teacher_ids.device)
    return bits.scatter_add_(1, teacher_ids // 32,
                             torch.bitwise_left_shift(one, (teacher_ids % 32).to(torch.int32)))


def sparse_rows(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_lse: torch.Tensor,
    labels: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    tail: str,
    options: KDOptions,
    block_v: int = 2048,
    block_k: int = 64,
) -> torch.Tensor:
    """Launch the sparse row kernel on student logits (C, V) and ids / logits (C, k), lse (C,);
    returns the per-token loss (C,) in fp32.

    ``grad_out`` (C, V), when given, receives d loss / d z_s; it may be ``student_logits``
    itself (the support entries are read before they are written). Rows must be unit-stride.
    """
    rows, vocab = student_logits.shape
    k = teacher_ids.shape[1]
    loss = torch.empty(rows, dtype=torch.float32, device=student_logits.device)
    if rows == 0:
        return loss
    log_p, log_tail = (x.float().contiguous() for x in sparse_teacher_log_probs(
        teacher_logits, teacher_lse, options.temperature, tail, options.divergence))
    ids = teacher_ids.contiguous()
    bits = support_bits(ids, vocab)
    block_v = min(block_v, triton.next_power_of_2(vocab))
    block_k = max(16, min(block_k, triton.next_power_of_2(k)))
    _sparse_rows_kernel[(rows,)](
        student_logits, bits, ids, log_p, log_tail,
        grad_out if grad_out is not None else student_logits,
        labels if labels is not None else loss,
        loss,
        vocab, k, student_logits.stride(0), bits.stride(0), ids.stride(0), log_p.stride(0),
        grad_out.stride(0) if grad_out is not None else 0,
        float(options.temperature), float(options.soft_weight), float(options.hard_weight),
        int(options.ignore_index),
        *transform_arguments(options.student_softcap, options.student_scale),
        BUCKET=tail == "bucket",
        REVERSE=options.divergence == "reverse_kl",
        HAS_LABELS=labels is not None,
        HAS_HARD=labels is not None and options.hard_weight > 0,
        COMPUTE_GRAD=grad_out is not None,
        BLOCK_V=block_v,
        BLOCK_K=block_k,
        STUDENT_TRANSFORM=transform_id(options.student_softcap, options.student_scale),
        num_warps=8 if block_v >= 2048 else 4,
    )
    return loss
