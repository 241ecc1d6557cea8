"""The output head (lm_head) of a causal LM as the (weight, bias) pair fastkd's losses take."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Config attributes that change the logits after the lm_head GEMM. Their meaning differs between
# model families (Granite divides by `logits_scaling`, HyperCLOVA X multiplies), so a model that
# sets one is refused rather than guessed at.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                     "lm_head_multiplier", "output_multiplier")


@dataclass
class Head:
    """An output head: logits = hidden @ weight.T + bias.

    Attributes:
        weight: (V, H) lm_head weight (a view of the model's parameter; gradients flow to it).
        bias: (V,) bias or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None


def check_plain_logits(model: nn.Module, name: str) -> None:
    """Raise `ValueError` when the model's logits are not exactly `lm_head(hidden)`."""
    config = model.config.get_text_config()
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(config, attr, None)
        if value is not None and value != 1.0:
            raise ValueError(
                f"{name}: {type(model).__name__} sets config.{attr}={value}; fastkd distils "
                "logits = lm_head(hidden) exactly and does not support soft-capped or rescaled "
                "logits"
            )


def output_head(model: nn.Module, rows: int) -> Head:
    """The first `rows` rows of the model's lm_head (rows < V drops padding rows)."""
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    bias = getattr(lm_head, "bias", None)
    return Head(lm_head.weight[:rows], None if bias is None else bias[:rows])


def vocab_rows(model: nn.Module) -> int:
    """Number of rows V of the model's lm_head."""
    return model.get_output_embeddings().weight.shape[0]
