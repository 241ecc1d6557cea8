"""`FeatureSettings`: the weights and options of the feature terms, checked without importing
torch or transformers (the CLI validates a config with it before any heavy import)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .layer_map import parse_pairs

if TYPE_CHECKING:
    from ..config import DistillConfig

TERMS = ("hidden", "attention", "ffn")
FEATURE_LOSSES = ("relative_mse", "mse", "cosine")
# attention maps: mean squared error of the maps, or KL per query row (MiniLM)
ATTENTION_LOSSES = ("mse", "kl")
WEIGHTINGS = ("entropy", "static")


@dataclass(frozen=True)
class FeatureSettings:
    """Weights and options of the feature terms (see `DistillConfig` for their meaning)."""

    hidden_weight: float = 0.0
    hidden_loss: str = "relative_mse"
    attention_weight: float = 0.0
    attention_loss: str = "mse"
    relation_heads: int | None = None
    ffn_weight: float = 0.0
    ffn_loss: str = "relative_mse"
    layer_map: str | tuple[tuple[int, int], ...] = "uniform"
    weighting: str = "entropy"
    teacher_priors: tuple[float, ...] | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        for term in TERMS:
            if getattr(self, f"{term}_weight") < 0:
                raise ValueError(f"{term}_weight must be >= 0, got "
                                 f"{getattr(self, f'{term}_weight')}")
        for name, value, choices in (("hidden_loss", self.hidden_loss, FEATURE_LOSSES),
                                     ("attention_loss", self.attention_loss, ATTENTION_LOSSES),
                                     ("ffn_loss", self.ffn_loss, FEATURE_LOSSES),
                                     ("weighting", self.weighting, WEIGHTINGS)):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")
        if self.relation_heads is not None and self.relation_heads < 1:
            raise ValueError(f"relation_heads must be >= 1, got {self.relation_heads}")
        if self.layer_map != "uniform":
            parse_pairs(self.layer_map)

    @classmethod
    def from_config(cls, cfg: DistillConfig) -> FeatureSettings:
        """The feature settings of a `DistillConfig`."""
        layer_map = cfg.layer_map if isinstance(cfg.layer_map, str) else tuple(
            tuple(pair) for pair in cfg.layer_map)
        priors = None if cfg.teacher_priors is None else tuple(cfg.teacher_priors)
        return cls(hidden_weight=cfg.hidden_weight, hidden_loss=cfg.hidden_loss,
                   attention_weight=cfg.attention_weight, attention_loss=cfg.attention_loss,
                   relation_heads=cfg.relation_heads, ffn_weight=cfg.ffn_weight,
                   ffn_loss=cfg.ffn_loss, layer_map=layer_map, weighting=cfg.weighting,
                   teacher_priors=priors, backend=cfg.backend)

    def weight(self, term: str) -> float:
        return getattr(self, f"{term}_weight")

    @property
    def active(self) -> tuple[str, ...]:
        """The terms with weight > 0."""
        return tuple(t for t in TERMS if self.weight(t) > 0)
