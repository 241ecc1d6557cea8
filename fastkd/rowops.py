"""The per-chunk row ops in plain PyTorch: the "torch" backend of the row kernels.

Same contracts as ``fastkd.kernels.kd_rows.kd_rows`` and
``fastkd.kernels.multi_teacher_rows.multi_teacher_rows``: reads student and teacher logits (C, V),
returns the per-token loss (C,) in fp32 and, when ``grad_out`` is given, writes the gradient of
each token's loss with respect to its raw student logits into it (it may alias the student
logits). Math in fp32 (float64 stays float64, for gradcheck).

With a logit transform in the options (fastkd/logit_transforms.py) every formula reads the
model's logits f(z) in place of z, and the gradient d loss / d f is multiplied by f'(z) last,
after the top-entry rewrite (which holds for d loss / d f, whose rows sum to zero).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastkd.logit_transforms import transformed_logits
from fastkd.options import KDOptions, MultiTeacherOptions


def kd_rows_torch(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    options: KDOptions,
) -> torch.Tensor:
    """Per-token loss (C,) of logits (C, V); fills ``grad_out`` (C, V) with d loss / d z_s."""
    math_dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    z_s, slope = transformed_logits(student_logits.to(math_dtype), options.student_softcap,
                                    options.student_scale, grad_out is not None)
    z_t, _ = transformed_logits(teacher_logits.to(math_dtype), options.teacher_softcap,
                                options.teacher_scale, False)
    T = options.temperature
    log_q = _tempered_log_softmax(z_s, T)  # student
    log_p = _tempered_log_softmax(z_t, T)  # teacher
    divergence, grad = tempered_divergence(log_p, log_q, options, grad_out is not None)
    loss = options.soft_weight * divergence
    if grad is not None and options.soft_weight != T:
        grad.mul_(options.soft_weight / T)  # chain rule through s = z_s / T
    # q - p has no cancelling constant: only reverse KL and JSD need the top-logit rewrite
    top = z_s.argmax(dim=-1, keepdim=True) if options.divergence != "kl" else None
    return _finish(z_s, labels, loss, grad, grad_out, options, log_q if T == 1 else None, top,
                   slope)


def tempered_divergence(
    log_p: torch.Tensor, log_q: torch.Tensor, options: KDOptions, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row divergence (C,) of log-probabilities (C, V) and, when ``want_grad``, its
    gradient with respect to the tempered student logits s (before the 1 / T chain rule).

    Shared by the dense row op and the sparse one (which passes the teacher's implied full
    distribution, docs/sparse.md).
    """
    grad = None
    if options.divergence == "kl":  # KL(p || q); d/ds = q - p
        p = log_p.exp()
        divergence = _xlogy(p, log_p - log_q).sum(-1)
        if want_grad:
            grad = log_q.exp().sub_(p)
    elif options.divergence == "reverse_kl":  # KL(q || p); d/ds = q (log q - log p - KL)
        q = log_q.exp()
        log_ratio = log_q - log_p
        divergence = _xlogy(q, log_ratio).sum(-1)
        if want_grad:
            grad = _xlogy(q, log_ratio.sub_(divergence[:, None]), out=log_ratio)
    else:
        # generalized JSD with M = beta p + (1 - beta) q and x = log(beta p / ((1 - beta) q)):
        # log q - log M = -log(1 - beta) - softplus(x), log p - log M = -log beta - softplus(-x),
        # so JSD = H(beta) - beta E_p[sp(-x)] - (1 - beta) E_q[sp(x)] and
        # d/ds = (1 - beta) q (E_q[sp(x)] - sp(x)), free of the constant log(1 - beta).
        beta = options.beta
        x = (log_p - log_q).add_(math.log(beta / (1 - beta)))
        q = log_q.exp()
        sp_x = F.softplus(x)
        eq_sp = _xlogy(q, sp_x).sum(-1)
        ep_sp_neg = _xlogy(log_p.exp(), F.softplus(x.neg_())).sum(-1)
        binary_entropy = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        divergence = binary_entropy - beta * ep_sp_neg - (1 - beta) * eq_sp
        if want_grad:
            grad = _xlogy(q, sp_x.neg_().add_(eq_sp[:, None]), out=sp_x).mul_(1 - beta)
    return divergence, grad


def _xlogy(
    weight: torch.Tensor, values: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """weight * values with 0 * anything = 0 (guards 0 * log 0 where weights underflow).

    Only an exact zero weight is masked, so NaN weights still propagate.
    """
    return torch.mul(weight, values, out=out).masked_fill_(weight == 0, 0.0)


def _tempered_log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits if temperature == 1 else logits / temperature, dim=-1)


def _finish(
    z_s: torch.Tensor,
    labels: torch.Tensor | None,
    loss: torch.Tensor,
    grad: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    options: KDOptions | MultiTeacherOptions,
    log_q1: torch.Tensor | None = None,
    top: torch.Tensor | None = None,
    slope: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Add the hard CE term, zero ignored tokens, write the gradient; returns the loss (C,).

    ``z_s`` are the student's (transformed) logits f(z). ``log_q1`` is log_softmax(z_s) when
    the caller has it already (T = 1); ``top``, when given, rewrites the gradient at ``top``
    (C, 1), the entries of the student's mode (below); ``slope``, f'(z) when the logits were
    transformed, turns d loss / d f into d loss / d z (after the rewrite).
    """
    counted = None
    if labels is not None:
        counted = labels != options.ignore_index
        if options.hard_weight > 0:  # CE at T = 1: LSE(z_s) - z_s[y]; grad softmax(z_s) - onehot
            safe = torch.where(counted, labels, torch.zeros_like(labels)).long()[:, None]
            log_q1 = torch.log_softmax(z_s, dim=-1) if log_q1 is None else log_q1
            loss = loss - options.hard_weight * log_q1.gather(1, safe).squeeze(1)
            if grad is not None:
                grad.add_(log_q1.exp(), alpha=options.hard_weight)
                grad.scatter_add_(1, safe, torch.full_like(grad[:, :1], -options.hard_weight))
        loss = loss.masked_fill(~counted, 0.0)
    if grad_out is not None:
        if counted is not None:
            grad.masked_fill_(~counted[:, None], 0.0)
        if top is not None:
            # Rows sum to zero (softmax is shift invariant). At the student's mode the
            # formulas cancel when q is near one-hot, so that entry is -(sum of the others).
            grad.scatter_(1, top, 0.0)
            grad.scatter_(1, top, -grad.sum(dim=-1, keepdim=True))
        if slope is not None:  # the chain rule through f
            grad.mul_(slope)
        grad_out.copy_(grad)
    return loss


def multi_teacher_rows_torch(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    options: MultiTeacherOptions,
    weights_out: torch.Tensor,
) -> torch.Tensor:
    """Per-token loss (C,) of student logits (C, V) against K teachers (K, C, V).

    Writes the mixing weights (C, K) into ``weights_out`` and d loss / d z_s into ``grad_out``.
    """
    math_dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    z_s, slope = transformed_logits(student_logits.to(math_dtype), options.student_softcap,
                                    options.student_scale, grad_out is not None)
    z_t = teacher_logits.to(math_dtype)
    if options.teacher_softcaps:  # teacher k's own transform
        z_t = torch.stack([transformed_logits(z_t[k], cap, scale, False)[0] for k, (cap, scale)
                           in enumerate(zip(options.teacher_softcaps, options.teacher_scales))])
    T = options.temperature
    log_q = _tempered_log_softmax(z_s, T)
    log_p = _tempered_log_softmax(z_t, T)  # (K, C, V)
    p = log_p.exp()
    log_prior = torch.tensor(options.priors, dtype=log_p.dtype, device=log_p.device)
    log_prior = log_prior.log()[:, None]  # (K, 1)
    if options.weighting == "entropy":  # w = softmax_k(log pi_k - H_k / tau)
        entropy = -_xlogy(p, log_p).sum(-1)  # (K, C)
        weights = torch.softmax(log_prior - entropy / options.entropy_tau, dim=0)
    else:
        weights = log_prior.exp().expand(-1, z_s.shape[0])
    weights_out.copy_(weights.T)
    mixture = (weights[..., None] * p).sum(0)  # P = sum_k w_k p_k, (C, V)
    if options.fusion == "mixture":  # KL(P || q)
        divergence = _xlogy(mixture, mixture.log() - log_q).sum(-1)
    else:  # sum_k w_k KL(p_k || q)
        divergence = (weights * _xlogy(p, log_p - log_q).sum(-1)).sum(0)
    loss = options.soft_weight * divergence
    grad = None
    if grad_out is not None:  # q - P, chain rule through z / T
        grad = log_q.exp().sub_(mixture)
        if options.soft_weight != T:
            grad.mul_(options.soft_weight / T)
    return _finish(z_s, labels, loss, grad, grad_out, options, log_q if T == 1 else None,
                   slope=slope)


# log of the smallest normal fp32: reverse KL floors the teacher's log-probabilities here, so a
# zero teacher probability (a -inf logit, a tail below teacher_lse's resolution) gives a large
# finite loss instead of inf and a NaN gradient (docs/sparse.md)
LOG_P_FLOOR = math.log(torch.finfo(torch.float32).tiny)


def sparse_kd_rows_torch(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_lse: torch.Tensor,
    labels: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    tail: str,
    options: KDOptions,
) -> torch.Tensor:
    """Per-token loss (C,) of student logits (C, V) against a sparse teacher; fills ``grad_out``.

    teacher_ids (C, k) int64 distinct per row, teacher_logits (C, k) raw teacher logits at
    them, teacher_lse (C,) = logsumexp over the full vocabulary of z_t / T. ``tail``:
    "bucket" (the k ids plus one tail bucket) or "renormalize" (both onto the k ids).
    docs/sparse.md derives the math.
    """
    math_dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    want_grad = grad_out is not None
    z_s, slope = transformed_logits(student_logits.to(math_dtype), options.student_softcap,
                                    options.student_scale, want_grad)
    T = options.temperature
    s = z_s if T == 1 else z_s / T
    ids = teacher_ids.long()
    log_p_ids, log_tail = (x.to(math_dtype) for x in sparse_teacher_log_probs(
        teacher_logits, teacher_lse, T, tail, options.divergence))
    if tail == "bucket":
        # The bucket divergence equals the full-vocabulary divergence against the implied
        # teacher p~: p on the ids, p_tail * q_j / q_tail elsewhere (docs/sparse.md)
        log_q = torch.log_softmax(s, dim=-1)
        support = torch.zeros_like(s, dtype=torch.bool).scatter_(1, ids, True)
        lse_off = torch.logsumexp(s.masked_fill(support, -math.inf), dim=-1, keepdim=True)
        log_p = (s - lse_off).add_(log_tail[:, None]).scatter_(1, ids, log_p_ids)
        divergence, grad = tempered_divergence(log_p, log_q, options, want_grad)
        log_q1 = log_q if T == 1 else None
        top = z_s.argmax(dim=-1, keepdim=True)  # the mode of q
    else:  # renormalize: q and p both softmaxed over the k ids; zero gradient elsewhere
        log_q_ids = torch.log_softmax(s.gather(1, ids), dim=-1)
        divergence, grad_ids = tempered_divergence(log_p_ids, log_q_ids, options, want_grad)
        grad = None
        if want_grad:
            grad = torch.zeros_like(s).scatter_(1, ids, grad_ids)
        log_q1 = None
        top = ids.gather(1, log_q_ids.argmax(dim=-1, keepdim=True))  # the mode of q on S
    loss = options.soft_weight * divergence
    if grad is not None and options.soft_weight != T:
        grad.mul_(options.soft_weight / T)  # chain rule through s = z_s / T
    return _finish(z_s, labels, loss, grad, grad_out, options, log_q1,
                   top if options.divergence == "reverse_kl" else None, slope)


def sparse_teacher_log_probs(
    teacher_logits: torch.Tensor,
    teacher_lse: torch.Tensor,
    temperature: float,
    tail: str,
    divergence: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's bucket log-probabilities in float64: log p on the ids (C, k) and
    log p_tail (C,) ("bucket"), or log softmax over the ids and -inf ("renormalize").

    p_tail = 1 - sum p is a difference of nearly equal numbers when the ids hold most of the
    mass; float64 over these k values per token (not V) makes it exact for the given inputs.
    Reverse KL floors both at LOG_P_FLOOR. The Triton launcher shares this (O(C k)) step.
    """
    tempered = teacher_logits.double() / temperature
    if tail == "bucket":
        log_p = tempered - teacher_lse.double()[:, None]
        log_tail = log1mexp(torch.logsumexp(log_p, dim=-1))
    else:
        log_p = torch.log_softmax(tempered, dim=-1)
        log_tail = torch.full_like(log_p[:, 0], -math.inf)
    if divergence == "reverse_kl":
        return log_p.clamp(min=LOG_P_FLOOR), log_tail.clamp(min=LOG_P_FLOOR)
    return log_p, log_tail


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0 (x > 0, a rounding excess, counts as 0: result -inf).

    expm1 near 0 and log1p far from it keep full relative precision (Maechler 2012).
    """
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)),
                       torch.log1p(-torch.exp(x)))
