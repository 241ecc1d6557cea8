"""Feature alignment for the distillation trainer: hidden states, attention maps and
feed-forward outputs of mapped layers (feature-alignment, multi-teacher and MaKD distillation).

`FeatureAlignment` ties the pieces together: the layer map (`layer_map`), the captures
(`layer_capture`, `attention_capture`, `capture`), the learned projections (`projections`),
the terms (`terms`) and the multi-teacher weighting of the terms (`teacher_weights`).
"""

from .alignment import FeatureAlignment, FeatureSettings
from .attention_capture import CapturedAttention, enable_attention_capture, record_attention
from .capture import FeatureRequest, Features, record_features
from .layer_map import layer_pairs, uniform_pairs
from .projections import FeatureProjections

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
