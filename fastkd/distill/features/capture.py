"""Everything feature alignment reads from one model's forward: the hidden states, attention
inputs and feed-forward outputs of chosen layers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from .attention_capture import CapturedAttention, record_attention
from .layer_capture import record_layer_outputs


@dataclass(frozen=True)
class FeatureRequest:
    """The layers to capture for each feature kind (empty: not captured)."""

    hidden: tuple[int, ...] = ()
    attention: tuple[int, ...] = ()
    ffn: tuple[int, ...] = ()


@dataclass
class Features:
    """Captured features, by layer index.

    Attributes:
        hidden: layer -> (B, T, H) output of the decoder layer.
        attention: layer -> post-RoPE q (B, H, L, D), k and v (B, H_kv, L, D).
        ffn: layer -> (B, T, H) output of the layer's MLP.
    """

    hidden: dict[int, torch.Tensor]
    attention: dict[int, CapturedAttention]
    ffn: dict[int, torch.Tensor]


@contextmanager
def record_features(model: nn.Module, request: FeatureRequest) -> Iterator[Features]:
    """Capture `request` during the forward(s) run inside the block.

    On leaving the block, `ValueError` names the model class and the layers of any requested
    feature that no forward produced (e.g. attention that bypassed the registry).
    """
    with ExitStack() as stack:
        features = Features(
            hidden=stack.enter_context(record_layer_outputs(model, request.hidden, "layer")),
            attention=(stack.enter_context(record_attention(model, request.attention))
                       if request.attention else {}),
            ffn=stack.enter_context(record_layer_outputs(model, request.ffn, "mlp")),
        )
        yield features
    for f in fields(request):
        missing = sorted(set(getattr(request, f.name)) - set(getattr(features, f.name)))
        if missing:
            name = type(extract_model_from_parallel(model)).__name__
            raise ValueError(f"{name}: the forward produced no {f.name} features for layers "
                             f"{missing}; this term cannot be computed for this model")
