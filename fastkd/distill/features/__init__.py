"""Feature alignment for the distillation trainer: hidden states, attention maps and
feed-forward outputs of mapped layers (feature-alignment, multi-teacher and MaKD distillation).

`FeatureAlignment` ties the pieces together: the layer map (`layer_map`), the captures
(`layer_capture`, `attention_capture`, `capture`), the learned projections (`projections`),
the terms (`terms`) and the multi-teacher weighting of the terms (`teacher_weights`).
`FeatureSettings` (`settings`) needs neither torch nor transformers; the other names are
imported on first use, so checking a config stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .layer_map import layer_pairs, uniform_pairs
from .settings import FeatureSettings

if TYPE_CHECKING:
    from .alignment import FeatureAlignment
    from .attention_capture import CapturedAttention, enable_attention_capture, record_attention
    from .capture import FeatureRequest, Features, record_features
    from .projections import FeatureProjections

_LAZY = {
    "FeatureAlignment": "alignment",
    "CapturedAttention": "attention_capture",
    "enable_attention_capture": "attention_capture",
    "record_attention": "attention_capture",
    "FeatureRequest": "capture",
    "Features": "capture",
    "record_features": "capture",
    "FeatureProjections": "projections",
}

__all__ = [
    "CapturedAttention",
    "FeatureAlignment",
    "FeatureProjections",
    "FeatureRequest",
    "FeatureSettings",
    "Features",
    "enable_attention_capture",
    "layer_pairs",
    "record_attention",
    "record_features",
    "uniform_pairs",
]


def __getattr__(name: str) -> Any:
    from .. import lazy_attribute

    return lazy_attribute(__name__, _LAZY, globals(), name)
