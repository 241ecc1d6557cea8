"""Outputs of chosen decoder layers (hidden states) and of their MLP modules (feed-forward
outputs), recorded by forward hooks during a model's normal forward."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Literal

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

Part = Literal["layer", "mlp"]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (possibly wrapped), in order.

    Raises `ValueError` naming the model class when its decoder has no `layers` list.
    """
    inner = extract_model_from_parallel(model)
    get_decoder = getattr(inner, "get_decoder", None)
    decoder = get_decoder() if get_decoder is not None else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(inner).__name__}: no decoder layer list found "
                         "(model.get_decoder().layers); feature alignment cannot hook its layers")
    return layers


def layer_module(model: nn.Module, index: int, part: Part) -> nn.Module:
    """Decoder layer `index` itself ("layer") or its feed-forward block ("mlp").

    Raises `ValueError` naming the model class when the layer has no `mlp` submodule.
    """
    layer = decoder_layers(model)[index]
    if part == "layer":
        return layer
    mlp = getattr(layer, "mlp", None)
    if not isinstance(mlp, nn.Module):
        name = type(extract_model_from_parallel(model)).__name__
        raise ValueError(f"{name}: decoder layer {index} ({type(layer).__name__}) has no `mlp` "
                         "module; feed-forward alignment cannot capture its output")
    return mlp


@contextmanager
def record_layer_outputs(
    model: nn.Module, layers: Iterable[int], part: Part
) -> Iterator[dict[int, torch.Tensor]]:
    """While active, the returned dict maps each layer index to the latest output of that
    layer ("layer": the (B, T, H) hidden state after the layer) or of its MLP ("mlp":
    the (B, T, H) feed-forward output, before the residual add)."""
    store: dict[int, torch.Tensor] = {}
    with ExitStack() as stack:
        for index in sorted(set(layers)):
            module = layer_module(model, index, part)
            handle = module.register_forward_hook(_recorder(store, index))
            stack.callback(handle.remove)
        yield store


def _recorder(store: dict[int, torch.Tensor], index: int):
    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        store[index] = output if torch.is_tensor(output) else output[0]

    return hook
