"""Post-RoPE queries and keys of chosen layers, recorded during the model's normal forward.

transformers routes each layer's attention through its attention-function registry
(`AttentionInterface`). `enable_attention_capture` registers the implementation
"fastkd_capture" and switches a model to it: it runs `sdpa_attention_forward` with the model's
own mask (the "sdpa" mask builder is registered under the same name), so outputs are those of
"sdpa" attention, and, inside `record_attention`, it also keeps the query (B, H, L, D), key and
value (B, H_kv, L, D) tensors of the chosen layers - after RoPE, keys not repeated for GQA. No
attention map is materialized and the model is never switched to eager attention.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .layer_capture import decoder_layers

CAPTURE_IMPLEMENTATION = "fastkd_capture"


@dataclass
class CapturedAttention:
    """One layer's attention inputs.

    Attributes:
        query: (B, H, L, D) after RoPE.
        key: (B, H_kv, L, D) after RoPE, not repeated for grouped-query attention.
        value: (B, H_kv, L, Dv).
        scaling: the softmax scale the layer uses (None: 1 / sqrt(D)).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scaling: float | None


# attention module -> the store of the `record_attention` block that watches it
_RECORDING: ContextVar[dict[nn.Module, dict[int, CapturedAttention]] | None] = ContextVar(
    "fastkd_attention_recording", default=None
)


def capture_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registered attention function: record (when watched), then run SDPA attention."""
    store = (_RECORDING.get() or {}).get(module)
    if store is not None:
        _check_plain(module, query.shape[2], kwargs)
        store[module.layer_idx] = CapturedAttention(query, key, value, kwargs.get("scaling"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def enable_attention_capture(model: nn.Module) -> None:
    """Switch `model` (possibly wrapped) to the capturing attention implementation.

    Raises `ValueError` naming the model class when the model does not route its attention
    through transformers' attention-function registry.
    """
    inner = extract_model_from_parallel(model)
    AttentionInterface.register(CAPTURE_IMPLEMENTATION, capture_attention_forward)
    AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)
    supported = getattr(inner, "_supports_attention_backend", False)
    if supported and inner.config._attn_implementation != CAPTURE_IMPLEMENTATION:
        inner.set_attn_implementation(CAPTURE_IMPLEMENTATION)
    if not supported or inner.config._attn_implementation != CAPTURE_IMPLEMENTATION:
        raise ValueError(
            f"{type(inner).__name__} does not use transformers' attention-function registry "
            "(AttentionInterface), so its queries and keys cannot be captured; set "
            "attention_weight to 0 for this model"
        )


@contextmanager
def record_attention(
    model: nn.Module, layers: Iterable[int]
) -> Iterator[dict[int, CapturedAttention]]:
    """While active, the returned dict maps each of `layers` to its latest `CapturedAttention`.

    `model` must have gone through `enable_attention_capture`. A layer whose attention did not
    pass through the registry during a forward is simply absent from the dict.
    """
    inner = extract_model_from_parallel(model)
    if inner.config._attn_implementation != CAPTURE_IMPLEMENTATION:
        raise ValueError(f"{type(inner).__name__} is not set up for attention capture; call "
                         "enable_attention_capture(model) first")
    store: dict[int, CapturedAttention] = {}
    all_layers = decoder_layers(inner)
    watched = {module: store for index in set(layers) for module in all_layers[index].modules()
               if getattr(module, "layer_idx", None) == index}
    token = _RECORDING.set({**(_RECORDING.get() or {}), **watched})
    try:
        yield store
    finally:
        _RECORDING.reset(token)


def _check_plain(module: nn.Module, length: int, kwargs: dict[str, Any]) -> None:
    """Refuse attention that `attention_kd_loss` (causal softmax of scaled q k^T) does not
    describe: soft-capped scores, a sliding window shorter than the sequence, non-causal."""
    window, causal = kwargs.get("sliding_window"), kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    reasons = {
        "soft-capped scores": kwargs.get("softcap") is not None,
        f"a sliding window of {window} < {length} tokens": window is not None and window < length,
        "non-causal attention": not causal,
    }
    found = [reason for reason, present in reasons.items() if present]
    if found:
        raise ValueError(
            f"{type(module).__name__} (layer {module.layer_idx}) uses {', '.join(found)}; "
            "attention alignment covers plain causal softmax attention only"
        )
