"""Logit distillation of Hugging Face causal LMs with fastkd's fused losses, plus feature
alignment of mapped layers (hidden states, attention, feed-forward outputs).

`DistillationTrainer` (a `transformers.Trainer`), its `DistillConfig`, the feature terms'
`FeatureSettings`, and the `fastkd distill` command (`fastkd.distill.cli`).
"""

from .config import DistillConfig
from .features import FeatureSettings
from .loss import LogitKD
from .trainer import DistillationTrainer

__all__ = ["DistillConfig", "DistillationTrainer", "FeatureSettings", "LogitKD"]
