"""The options of a vocabulary distillation loss, checked once and passed down as one value."""

from __future__ import annotations

from dataclasses import dataclass

DIVERGENCES = ("kl", "reverse_kl", "jsd")


@dataclass(frozen=True)
class KDOptions:
    """Per-token loss = soft_weight * divergence(T) + hard_weight * CE(T = 1).

    The student's and teacher's logits are first transformed by the model's own
    f(z) = softcap tanh(scale z / softcap) (softcap 0.0: f(z) = scale z), as
    fastkd/logit_transforms.py describes.
    """

    divergence: str = "kl"
    beta: float = 0.5
    temperature: float = 1.0
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    ignore_index: int = -100
    student_softcap: float = 0.0
    student_scale: float = 1.0
    teacher_softcap: float = 0.0
    teacher_scale: float = 1.0


WEIGHTINGS = ("entropy", "static")
FUSIONS = ("mixture", "weighted_kl")


@dataclass(frozen=True)
class MultiTeacherOptions:
    """Per-token loss = soft_weight * fused KL(T) + hard_weight * CE(T = 1).

    ``priors`` are the K normalized teacher priors pi (sum 1), Python floats (so that the
    row ops take them as a ``float[]`` argument and ``torch.compile`` sees constants).
    ``teacher_softcaps`` and ``teacher_scales`` hold K values each (teacher k's transform) or
    are empty (no transform for any teacher).
    """

    priors: tuple[float, ...]
    temperature: float = 1.0
    weighting: str = "entropy"
    entropy_tau: float = 1.0
    fusion: str = "mixture"
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    ignore_index: int = -100
    student_softcap: float = 0.0
    student_scale: float = 1.0
    teacher_softcaps: tuple[float, ...] = ()
    teacher_scales: tuple[float, ...] = ()
