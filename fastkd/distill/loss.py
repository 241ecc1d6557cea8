"""The logit-distillation loss of one batch, from hidden states and lm_head weights.

Calls `fused_kd_loss` (one teacher) or `multi_teacher_kd_loss` (several), or `sparse_kd_loss`
for a captured top-k teacher; full tokens x vocab logits are never materialized here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastkd import fused_kd_loss, multi_teacher_kd_loss, sparse_kd_loss
from fastkd._checks import check_loss_weights

from .config import DistillConfig
from .heads import Head

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T) targets of each position: position t predicts labels[t + 1]; the
    last position predicts nothing (IGNORE_INDEX)."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


@dataclass(frozen=True)
class LogitKD:
    """Settings of the output-distribution term (see `DistillConfig` for their meaning)."""

    divergence: str = "kl"
    beta: float = 0.5
    alpha: float = 0.9
    temperature: float = 1.0
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    weighting: str = "entropy"
    entropy_tau: float = 1.0
    teacher_priors: tuple[float, ...] | None = None
    fusion: str = "mixture"
    backend: str = "auto"
    tail: str = "bucket"  # top-k teachers (sparse_kd_loss)

    def __post_init__(self) -> None:
        check_loss_weights(self.soft_weight, self.hard_weight)

    @classmethod
    def from_config(cls, cfg: DistillConfig) -> LogitKD:
        priors = None if cfg.teacher_priors is None else tuple(cfg.teacher_priors)
        return cls(cfg.divergence, cfg.beta, cfg.alpha, cfg.temperature, cfg.soft_weight,
                   cfg.hard_weight, cfg.weighting, cfg.entropy_tau, priors, cfg.fusion,
                   cfg.backend, cfg.topk_tail)

    def __call__(
        self,
        student_hidden: torch.Tensor,
        student: Head,
        teacher_hiddens: list[torch.Tensor],
        teachers: list[Head],
        targets: torch.Tensor,
        return_parts: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """Summed loss over counted tokens, and the teachers' mixing weights.

        Args:
            student_hidden: (B, T, Hs) final hidden states of the student.
            student: its head, weight (V, Hs), with the student's logit transform.
            teacher_hiddens: K tensors (B, T, Ht_k).
            teachers: K heads, weight (V, Ht_k), sliced to the student's V, each with its
                teacher's logit transform.
            targets: (B, T) shifted labels, IGNORE_INDEX where nothing is predicted.
            return_parts: also return the parts of the loss from the same call.

        Returns:
            (loss summed over counted tokens (scalar), mixing weights (B, T, K) or None for
            one teacher), and with ``return_parts`` a third entry, the `LogitParts`.
        """
        common = self._common(student, return_parts)
        weight = _as(student.weight, student_hidden)
        if len(teachers) == 1:
            out = fused_kd_loss(
                student_hidden, weight, teacher_hiddens[0],
                _as(teachers[0].weight, teacher_hiddens[0]), targets,
                teacher_bias=teachers[0].bias, divergence=self.divergence, beta=self.beta,
                alpha=self.alpha, teacher_softcap=teachers[0].softcap,
                teacher_logit_scale=teachers[0].scale, **common,
            )
            return _with_parts(out, None, return_parts)
        *out, mixing = multi_teacher_kd_loss(
            student_hidden, weight, teacher_hiddens,
            [_as(t.weight, h) for t, h in zip(teachers, teacher_hiddens, strict=True)], targets,
            teacher_biases=[t.bias for t in teachers], weighting=self.weighting,
            entropy_tau=self.entropy_tau, teacher_priors=self.teacher_priors,
            fusion=self.fusion, return_mixing=True,
            teacher_softcap=[t.softcap for t in teachers],
            teacher_logit_scale=[t.scale for t in teachers], **common,
        )
        return _with_parts(tuple(out) if return_parts else out[0], mixing, return_parts)

    def sparse(
        self,
        student_hidden: torch.Tensor,
        student: Head,
        teacher_ids: torch.Tensor,
        teacher_logits: torch.Tensor,
        teacher_lse: torch.Tensor,
        targets: torch.Tensor,
        return_parts: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, LogitParts]:
        """Summed loss over counted tokens against a top-k teacher (`sparse_kd_loss`), and
        with ``return_parts`` its `LogitParts` from the same call.

        Args:
            student_hidden: (N, Hs); student: its head, weight (V, Hs).
            teacher_ids, teacher_logits: (N, k) the teacher's k largest emitted logits (its
                soft-cap / logit scale applied at capture) and their ids.
            teacher_lse: (N,) the teacher's logsumexp(logits / temperature) over all V.
            targets: (N,) labels, IGNORE_INDEX where nothing is predicted.
        """
        out = sparse_kd_loss(
            student_hidden, _as(student.weight, student_hidden), teacher_ids, teacher_logits,
            teacher_lse, targets, divergence=self.divergence, tail=self.tail,
            **self._common(student, return_parts),
        )
        return (out[0], LogitParts(*out[1:])) if return_parts else out

    def _common(self, student: Head, return_parts: bool) -> dict:
        """The keyword arguments every loss call shares (the student's logit transform
        included; teachers' transforms are per call: a topk capture holds emitted logits)."""
        return dict(
            student_bias=student.bias,
            student_softcap=student.softcap,
            student_logit_scale=student.scale,
            temperature=self.temperature,
            soft_weight=self.soft_weight,
            hard_weight=self.hard_weight,
            ignore_index=IGNORE_INDEX,
            reduction="sum",
            backend=self.backend,
            return_parts=return_parts,
        )


@dataclass(frozen=True)
class LogitParts:
    """The two parts of a summed logit loss, unweighted and detached (scalars): loss =
    soft_weight * divergence + hard_weight * hard_ce, from the one loss call that trains."""

    divergence: torch.Tensor
    hard_ce: torch.Tensor

    def sums(self) -> dict[str, float]:
        """The parts as the trainer logs them (one host read for both)."""
        divergence, hard_ce = torch.stack([self.divergence, self.hard_ce]).tolist()
        return {"kd_divergence": divergence, "kd_hard_ce": hard_ce}


def _with_parts(out, mixing: torch.Tensor | None, return_parts: bool) -> tuple:
    """(loss, mixing) or, from a loss call's (loss, soft, hard), (loss, mixing, LogitParts)."""
    if not return_parts:
        return out, mixing
    loss, divergence, hard_ce = out
    return loss, mixing, LogitParts(divergence, hard_ce)


def _as(weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """`weight` in the dtype of `hidden` (mixed precision runs the decoder in a lower one)."""
    return weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
