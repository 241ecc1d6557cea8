"""The per-chunk row ops in plain PyTorch: the "torch" backend of the row kernels.

Same contracts as ``fastkd.kernels.kd_rows.kd_rows`` and
``fastkd.kernels.multi_teacher_rows.multi_teacher_rows``: reads student and teacher logits (C, V),
returns the per-token loss (C,) in fp32 and, when ``grad_out`` is given, writes the gradient of
each token's loss with respect to its raw student logits into it (it may alias the student
logits). Math in fp32 (float64 stays float64, for gradcheck).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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
    z_s = student_logits.to(math_dtype)
    T = options.temperature
    log_q = torch.log_softmax(z_s / T, dim=-1)  # student, tempered
    log_p = torch.log_softmax(teacher_logits.to(math_dtype) / T, dim=-1)  # teacher, tempered
    q, p = log_q.exp(), log_p.exp()

    if options.divergence == "kl":  # KL(p || q); d/ds = q - p
        divergence = _xlogy_sum(p, log_p - log_q)
        grad = q - p
    elif options.divergence == "reverse_kl":  # KL(q || p); d/ds = q (log q - log p - KL)
        divergence = _xlogy_sum(q, log_q - log_p)
        grad = _xlogy(q, log_q - log_p - divergence[:, None])
    else:
        # generalized JSD with M = beta p + (1 - beta) q and x = log(beta p / ((1 - beta) q)):
        # log q - log M = -log(1 - beta) - softplus(x), log p - log M = -log beta - softplus(-x),
        # so JSD = H(beta) - beta E_p[sp(-x)] - (1 - beta) E_q[sp(x)] and
        # d/ds = (1 - beta) q (E_q[sp(x)] - sp(x)), free of the constant log(1 - beta).
        beta = options.beta
        x = math.log(beta / (1 - beta)) + log_p - log_q
        eq_sp = _xlogy_sum(q, F.softplus(x))
        binary_entropy = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        divergence = binary_entropy - beta * _xlogy_sum(p, F.softplus(-x)) - (1 - beta) * eq_sp
        grad = (1 - beta) * _xlogy(q, eq_sp[:, None] - F.softplus(x))
    loss = options.soft_weight * divergence
    grad = grad * (options.soft_weight / T)  # chain rule through s = z_s / T
    return _finish(z_s, labels, loss, grad, grad_out, options)


def _finish(
    z_s: torch.Tensor,
    labels: torch.Tensor | None,
    loss: torch.Tensor,
    grad: torch.Tensor,
    grad_out: torch.Tensor | None,
    options: KDOptions | MultiTeacherOptions,
) -> torch.Tensor:
    """Add the hard CE term, zero ignored tokens, write the gradient; returns the loss (C,)."""
    counted = torch.ones_like(loss, dtype=torch.bool)
    if labels is not None:
        counted = labels != options.ignore_index
        if options.hard_weight > 0:  # CE at T = 1: LSE(z_s) - z_s[y]; grad softmax(z_s) - onehot
            safe = torch.where(counted, labels, torch.zeros_like(labels)).long()
            log_q1 = torch.log_softmax(z_s, dim=-1)
            loss = loss - options.hard_weight * log_q1.gather(1, safe[:, None]).squeeze(1)
            grad = grad + options.hard_weight * log_q1.exp()
            grad.scatter_add_(1, safe[:, None], torch.full_like(grad[:, :1], -options.hard_weight))

    loss = torch.where(counted, loss, torch.zeros_like(loss))
    if grad_out is not None:
        grad = torch.where(counted[:, None], grad, torch.zeros_like(grad))
        # Rows sum to zero (softmax is shift invariant). At the top student logit the formulas
        # cancel when q is near one-hot, so that entry is -(sum of the others) instead.
        top = z_s.argmax(dim=-1, keepdim=True)
        grad.scatter_(1, top, 0.0)
        grad.scatter_(1, top, -grad.sum(dim=-1, keepdim=True))
        grad_out.copy_(grad)
    return loss


def _xlogy(weight: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """weight * log_ratio with 0 * anything = 0 (guards 0 * log 0 where weights underflow).

    Only an exact zero weight is masked, so NaN weights still propagate.
    """
    return torch.where(weight == 0, torch.zeros_like(weight), weight * log_ratio)


def _xlogy_sum(weight: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    return _xlogy(weight, log_ratio).sum(-1)


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
    z_s = student_logits.to(math_dtype)
    T = options.temperature
    log_q = torch.log_softmax(z_s / T, dim=-1)
    log_p = torch.log_softmax(teacher_logits.to(math_dtype) / T, dim=-1)  # (K, C, V)
    p = log_p.exp()
    log_prior = options.priors.to(log_p).log()[:, None]  # (K, 1)
    if options.weighting == "entropy":  # w = softmax_k(log pi_k - H_k / tau)
        entropy = -_xlogy_sum(p, log_p)  # (K, C)
        weights = torch.softmax(log_prior - entropy / options.entropy_tau, dim=0)
    else:
        weights = log_prior.exp().expand(-1, z_s.shape[0])
    weights_out.copy_(weights.T)
    mixture = (weights[..., None] * p).sum(0)  # P = sum_k w_k p_k, (C, V)
    if options.fusion == "mixture":  # KL(P || q)
        divergence = _xlogy_sum(mixture, mixture.log() - log_q)
    else:  # sum_k w_k KL(p_k || q)
        divergence = (weights * _xlogy_sum(p, log_p - log_q)).sum(0)
    loss = options.soft_weight * divergence
    grad = (log_q.exp() - mixture) * (options.soft_weight / T)  # q - P, chain rule through z / T
    return _finish(z_s, labels, loss, grad, grad_out, options)
