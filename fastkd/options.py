"""The options of a vocabulary distillation loss, checked once and passed down as one value."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DIVERGENCES = ("kl", "reverse_kl", "jsd")


@dataclass(frozen=True)
class KDOptions:
    """Per-token loss = soft_weight * divergence(T) + hard_weight * CE(T = 1)."""

    divergence: str = "kl"
    beta: float = 0.5
    temperature: float = 1.0
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    ignore_index: int = -100


WEIGHTINGS = ("entropy", "static")
FUSIONS = ("mixture", "weighted_kl")


@dataclass(frozen=True)
class MultiTeacherOptions:
    """Per-token loss = soft_weight * fused KL(T) + hard_weight * CE(T = 1).

    ``priors`` (K,) are the normalized teacher priors pi (sum 1).
    """

    priors: torch.Tensor
    temperature: float = 1.0
    weighting: str = "entropy"
    entropy_tau: float = 1.0
    fusion: str = "mixture"
    soft_weight: float = 1.0
    hard_weight: float = 0.0
    ignore_index: int = -100
