"""The output head (lm_head) of a causal LM as the (weight, bias) pair fastkd's losses take,
with the transform the model applies to the head's output: the logits it emits are

    f(z) = cap * tanh(scale * z / cap)      (cap None: f(z) = scale * z),  z = hidden @ W.T + b

which the fused losses take as softcap / logit_scale keywords.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# Config attributes that change the logits after the lm_head GEMM. Their meaning differs between
# model families (Granite divides by `logits_scaling`, HyperCLOVA X multiplies, MiniCPM3 divides
# the hidden state), so they are read only for the classes below, whose forwards were read.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                     "lm_head_multiplier", "output_multiplier")


def _softcap(config) -> tuple[float | None, float]:
    # Gemma2ForCausalLM, Gemma3ForCausalLM: logits / cap, tanh, * cap (cap None: none)
    return config.final_logit_softcapping, 1.0


def _divided(config) -> tuple[float | None, float]:
    # GraniteForCausalLM: logits / config.logits_scaling
    return None, 1.0 / config.logits_scaling


def _multiplied(config) -> tuple[float | None, float]:
    # CohereForCausalLM, Cohere2ForCausalLM: logits * config.logit_scale
    return None, config.logit_scale


# class name -> (the config attribute its forward applies to the lm_head output, its reader).
# Gemma3ForConditionalGeneration is not here: its forward applies no cap (transformers 5.24),
# whatever its text config's final_logit_softcapping says.
_FAMILIES: dict[str, tuple[str, Callable]] = {
    "Gemma2ForCausalLM": ("final_logit_softcapping", _softcap),
    "Gemma3ForCausalLM": ("final_logit_softcapping", _softcap),
    "GraniteForCausalLM": ("logits_scaling", _divided),
    "CohereForCausalLM": ("logit_scale", _multiplied),
    "Cohere2ForCausalLM": ("logit_scale", _multiplied),
}


@dataclass
class Head:
    """An output head: logits = f(hidden @ weight.T + bias), f as in the module docstring.

    Attributes:
        weight: (V, H) lm_head weight (a view of the model's parameter; gradients flow to it).
        bias: (V,) bias or None.
        softcap: the cap of f, or None (no tanh).
        scale: the logit scale of f (1.0: none).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None = None
    scale: float = 1.0

    @property
    def plain(self) -> bool:
        """True when f is the identity (logits = hidden @ weight.T + bias)."""
        return self.softcap is None and self.scale == 1.0

    def emitted(self, z: torch.Tensor) -> torch.Tensor:
        """f(z): the logits the model emits for head outputs z (any shape, last dim V)."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def logit_transform(model: nn.Module, name: str = "model") -> tuple[float | None, float]:
    """(softcap, scale) of the transform `model`'s forward applies to its lm_head output.

    Read from the text config (`config.get_text_config()`) for the classes whose forward
    applies it (Gemma 2/3 soft-capping, Granite's and Cohere's logit scales; a peft or FSDP2
    wrapper is seen through). Raises `ValueError` for any other transform attribute set.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config()
    family = next((_FAMILIES[c.__name__] for c in type(base).__mro__
                   if c.__name__ in _FAMILIES), None)
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(config, attr, None)
        if value is not None and value != 1.0 and (family is None or attr != family[0]):
            raise ValueError(
                f"{name}: {type(base).__name__} sets config.{attr}={value}; fastkd distils "
                "logits = lm_head(hidden), soft-capped or scaled only as Gemma 2/3, Granite "
                "and Cohere do, and does not support this model's soft-capped or rescaled "
                "logits"
            )
    if family is None:
        return None, 1.0
    softcap, scale = family[1](config)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{name}: config.final_logit_softcapping must be > 0, got {softcap}")
    if not (isinstance(scale, int | float) and scale > 0):
        raise ValueError(f"{name}: {type(base).__name__}'s logit scale must be > 0, got {scale}")
    return (None if softcap is None else float(softcap)), float(scale)


def output_head(model: nn.Module, rows: int, name: str = "model") -> Head:
    """The first `rows` rows of the model's lm_head (rows < V drops padding rows), with the
    model's logit transform (`logit_transform`)."""
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    bias = getattr(lm_head, "bias", None)
    return Head(lm_head.weight[:rows], None if bias is None else bias[:rows],
                *logit_transform(model, name))


def vocab_rows(model: nn.Module) -> int:
    """Number of rows V of the model's lm_head."""
    return model.get_output_embeddings().weight.shape[0]
