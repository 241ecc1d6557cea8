"""Logit distillation of Hugging Face causal LMs with fastkd's fused losses, plus feature
alignment of mapped layers (hidden states, attention, feed-forward outputs).

`DistillationTrainer` (a `transformers.Trainer`), its `DistillConfig`, the feature terms'
`FeatureSettings`, and the `fastkd distill` command (`fastkd.distill.cli`).

The trainer needs the `train` extra (`pip install 'fastkd[train]'`: transformers, datasets,
accelerate, PyYAML, tqdm). Its names are imported on first use, so `fastkd distill --help` and
the config checks run without those heavy imports, and a missing extra is named in one line.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from .config import DistillConfig
from .features.settings import FeatureSettings

if TYPE_CHECKING:
    from .loss import LogitKD
    from .trainer import DistillationTrainer

# the `train` extra of pyproject.toml: import name -> distribution name
TRAIN_EXTRA = {"transformers": "transformers", "datasets": "datasets",
               "accelerate": "accelerate", "yaml": "pyyaml", "tqdm": "tqdm",
               "safetensors": "safetensors"}

_LAZY = {"DistillationTrainer": "trainer", "LogitKD": "loss"}

__all__ = ["DistillConfig", "DistillationTrainer", "FeatureSettings", "LogitKD"]


def missing_train_extra() -> list[str]:
    """The distributions of the `train` extra that are not installed."""
    return [dist for module, dist in TRAIN_EXTRA.items()
            if importlib.util.find_spec(module) is None]


def require_train_extra() -> None:
    """Raise `ModuleNotFoundError` naming the extra to install when part of it is missing."""
    missing = missing_train_extra()
    if missing:
        raise ModuleNotFoundError(
            f"fastkd.distill needs the train extra, which is not installed (missing: "
            f"{', '.join(missing)}): pip install 'fastkd[train]'"
        )


def lazy_attribute(package: str, lazy: dict[str, str], namespace: dict, name: str) -> Any:
    """``name`` of ``package`` imported on first use from its submodule ``lazy[name]`` (the
    train extra checked first) and kept in ``namespace``: a package's ``__getattr__``."""
    if name not in lazy:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    require_train_extra()
    value = getattr(importlib.import_module(f".{lazy[name]}", package), name)
    namespace[name] = value
    return value


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _LAZY, globals(), name)
