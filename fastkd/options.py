"""The options of a vocabulary distillation loss, checked once and passed down as one value."""

from __future__ import annotations

from dataclasses import dataclass

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
