"""Float64 oracles: slow, obvious, materializing versions of every loss.

Imported by the tests and the benchmarks only. Each function materializes the full logits in
float64 and follows docs/design.md section 2 word for word; gradients come from autograd through it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastkd.reference_attention import attention_kd_loss_reference  # noqa: F401 (re-export)


def _divergence_per_token(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """Per-token divergence between tempered softmaxes; logits (N, V) float64 -> (N,)."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    if divergence == "kl":  # KL(p || q)
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if divergence == "reverse_kl":  # KL(q || p)
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    if divergence == "jsd":  # beta KL(p || M) + (1 - beta) KL(q || M), M = beta p + (1 - beta) q
        log_m = torch.logsumexp(
            torch.stack([log_p + torch.log(torch.tensor(beta, dtype=log_p.dtype)),
                         log_q + torch.log(torch.tensor(1 - beta, dtype=log_q.dtype))]),
            dim=0,
        )
        kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
        kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
        return beta * kl_pm + (1 - beta) * kl_qm
    raise ValueError(f"unknown divergence {divergence!r}")


def model_logits(logits: torch.Tensor, softcap: float | None, scale: float) -> torch.Tensor:
    """The logits a model emits from raw float64 logits: softcap tanh(scale z / softcap), or
    scale z without a cap (docs/design.md)."""
    if softcap is None:
        return logits * scale
    return softcap * torch.tanh(logits * (scale / softcap))


def _reduce(per_token: torch.Tensor, counted: torch.Tensor, reduction: str) -> torch.Tensor:
    per_token = torch.where(counted, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    return total / counted.sum().clamp(min=1)


def kd_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
) -> torch.Tensor:
    """Distillation loss on given raw logits (..., V), computed in float64 on the model's
    logits ``model_logits(z, softcap, logit_scale)`` of student and teacher.

    Returns a float64 scalar, or the per-token loss in the leading shape for ``"none"``.
    """
    leading = student_logits.shape[:-1]
    z_s = model_logits(student_logits.reshape(-1, student_logits.shape[-1]).double(),
                       student_softcap, student_logit_scale)
    z_t = model_logits(teacher_logits.reshape(-1, teacher_logits.shape[-1]).double(),
                       teacher_softcap, teacher_logit_scale)
    loss = soft_weight * _divergence_per_token(z_s, z_t, divergence, beta, temperature)
    return _hard_ce_and_reduce(loss, z_s, labels, hard_weight, ignore_index, reduction, leading)


def _hard_ce_and_reduce(
    loss: torch.Tensor,
    z_s: torch.Tensor,
    labels: torch.Tensor | None,
    hard_weight: float,
    ignore_index: int,
    reduction: str,
    leading: torch.Size,
) -> torch.Tensor:
    """loss (N,) + hard_weight * CE(z_s, label) on counted tokens, then the reduction."""
    if labels is None:
        counted = torch.ones(z_s.shape[0], dtype=torch.bool, device=z_s.device)
    else:
        flat_labels = labels.reshape(-1).long()
        counted = flat_labels != ignore_index
        if hard_weight > 0:
            safe = torch.where(counted, flat_labels, torch.zeros_like(flat_labels))
            loss = loss + hard_weight * F.cross_entropy(z_s, safe, reduction="none")
    out = _reduce(loss, counted, reduction)
    return out.reshape(leading) if reduction == "none" else out


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = hidden.reshape(-1, hidden.shape[-1]).double() @ weight.double().T
    return logits if bias is None else logits + bias.double()


def fused_kd_loss_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """``kd_loss_reference`` on materialized float64 logits ``hidden @ weight.T + bias``."""
    leading = student_hidden.shape[:-1]
    z_s = _logits(student_hidden, student_weight, student_bias)
    z_t = _logits(teacher_hidden, teacher_weight, teacher_bias)
    out = kd_loss_reference(z_s, z_t, labels, **options)
    return out.reshape(leading) if options.get("reduction") == "none" else out


def multi_teacher_kd_loss_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hiddens: list[torch.Tensor],
    teacher_weights: list[torch.Tensor],
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_biases: list[torch.Tensor | None] | None = None,
    temperature: float = 1.0,
    weighting: str = "entropy",
    entropy_tau: float = 1.0,
    teacher_priors: list[float] | torch.Tensor | None = None,
    fusion: str = "mixture",
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_mixing: bool = False,
    student_softcap: float | None = None,
    teacher_softcap: float | None | list[float | None] = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float | list[float] = 1.0,
):
    """Multi-teacher distillation loss on materialized float64 logits.

    w_k = softmax_k(log pi_k - H(p_k) / tau) ("entropy") or pi_k ("static"); the target is
    KL(sum_k w_k p_k || q) ("mixture") or sum_k w_k KL(p_k || q) ("weighted_kl"). Every model's
    logits are ``model_logits`` of its raw ones; teacher_softcap / teacher_logit_scale are one
    value for all teachers or a list of K.
    """
    leading = student_hidden.shape[:-1]
    teachers = len(teacher_hiddens)
    biases = teacher_biases or [None] * teachers
    caps = teacher_softcap if isinstance(teacher_softcap, (list, tuple)) else [
        teacher_softcap] * teachers
    scales = teacher_logit_scale if isinstance(teacher_logit_scale, (list, tuple)) else [
        teacher_logit_scale] * teachers
    z_s = model_logits(_logits(student_hidden, student_weight, student_bias), student_softcap,
                       student_logit_scale)
    log_q = F.log_softmax(z_s / temperature, -1)
    log_p = torch.stack([
        F.log_softmax(model_logits(_logits(h, w, b), cap, scale) / temperature, -1)
        for h, w, b, cap, scale in zip(teacher_hiddens, teacher_weights, biases, caps, scales)
    ])  # (K, N, V)
    p = log_p.exp()
    # float64 from the start: as_tensor of a list of Python floats would round them to fp32
    priors = torch.ones(teachers) if teacher_priors is None else torch.as_tensor(
        teacher_priors, dtype=torch.float64)
    priors = (priors.double() / priors.double().sum()).to(log_p.device)[:, None]  # (K, 1)
    if weighting == "entropy":
        entropy = -(p * log_p).sum(-1)  # (K, N)
        weights = torch.softmax(priors.log() - entropy / entropy_tau, dim=0)
    else:
        weights = priors.expand(-1, log_q.shape[0])
    if fusion == "mixture":
        mixture = (weights[..., None] * p).sum(0)
        divergence = (torch.xlogy(mixture, mixture) - mixture * log_q).sum(-1)  # 0 log 0 = 0
    else:
        divergence = (weights * (p * (log_p - log_q)).sum(-1)).sum(0)
    out = _hard_ce_and_reduce(soft_weight * divergence, z_s, labels, hard_weight, ignore_index,
                              reduction, leading)
    if return_mixing:
        return out, weights.T.reshape(*leading, teachers)
    return out


def sparse_kd_loss_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_lse: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    divergence: str = "kl",
    temperature: float = 1.0,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    tail: str = "bucket",
    student_softcap: float | None = None,
    student_logit_scale: float = 1.0,
) -> torch.Tensor:
    """``sparse_kd_loss`` on materialized float64 logits, bucket by bucket (docs/sparse.md).

    "bucket": the divergence over the k + 1 buckets (p_S, 1 - sum p_S) and (q_S, 1 - sum q_S),
    with q_tail summed over the off-support ids directly; "renormalize": over the k ids of
    p_S / sum p_S and q_S / sum q_S. Reverse KL floors p at 2^-126, as the kernels do. The
    student's logits are ``model_logits`` of its raw ones; the teacher's are as stored.
    """
    leading = student_hidden.shape[:-1]
    z_s = model_logits(_logits(student_hidden, student_weight, student_bias), student_softcap,
                       student_logit_scale)
    k = teacher_ids.shape[-1]
    ids = teacher_ids.reshape(-1, k).long()
    t = teacher_logits.reshape(-1, k).double() / temperature
    log_q = F.log_softmax(z_s / temperature, dim=-1)
    log_q_ids = log_q.gather(1, ids)
    if tail == "bucket":
        log_p_ids = t - teacher_lse.reshape(-1, 1).double()
        p_tail = (1 - log_p_ids.exp().sum(-1, keepdim=True)).clamp(min=0)
        off = torch.ones_like(log_q, dtype=torch.bool).scatter_(1, ids, False)
        q_tail = torch.where(off, log_q.exp(), 0).sum(-1, keepdim=True)
        # k = V leaves no tail bucket: p_tail = q_tail = 1 there makes its term exactly 0
        has_tail = off.any(-1, keepdim=True)
        log_p = torch.cat([log_p_ids, torch.where(has_tail, p_tail, 1).log()], dim=-1)
        log_q = torch.cat([log_q_ids, torch.where(has_tail, q_tail, 1).log()], dim=-1)
    else:
        log_p = F.log_softmax(t, dim=-1)
        log_q = F.log_softmax(log_q_ids, dim=-1)
    if divergence == "kl":  # 0 log 0 = 0 (an empty tail, a padded id)
        per_token = (torch.xlogy(log_p.exp(), log_p.exp()) - torch.where(
            log_p > -torch.inf, log_p.exp() * log_q, 0)).sum(-1)
    else:
        log_p = log_p.clamp(min=math.log(2.0**-126))
        per_token = (torch.xlogy(log_q.exp(), log_q.exp()) - log_q.exp() * log_p).sum(-1)
    return _hard_ce_and_reduce(soft_weight * per_token, z_s, labels, hard_weight, ignore_index,
                               reduction, leading)
