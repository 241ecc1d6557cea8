"""Logit distillation of Hugging Face causal LMs with fastkd's fused losses.

`DistillationTrainer` (a `transformers.Trainer`), its `DistillConfig`, and the `fastkd distill`
command (`fastkd.distill.cli`).
"""

from .config import DistillConfig
from .loss import LogitKD
from .trainer import DistillationTrainer

__all__ = ["DistillConfig", "DistillationTrainer", "LogitKD"]
