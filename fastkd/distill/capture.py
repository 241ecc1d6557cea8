"""Run a causal LM to its final hidden state without computing its full logits.

The model is called through its own forward (so DDP / FSDP wrappers see the call) with
`logits_to_keep=1`; a forward hook on the decoder records the decoder's output, the final-norm
hidden state that the lm_head reads. Further captures (intermediate layers, attention inputs)
hook in the same way.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn


@contextmanager
def record_output(module: nn.Module, store: dict[str, Any], key: str):
    """While active, `store[key]` receives the first output tensor of each `module` call."""

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        store[key] = output if torch.is_tensor(output) else output[0]

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def final_hidden(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """(B, T, H) final hidden state of `model` (a causal LM, possibly wrapped) on a batch.

    Args:
        model: a `*ForCausalLM` model or a DDP / FSDP / compiled wrapper of one.
        input_ids: (B, T) token ids.
        attention_mask: (B, T) 1 for real tokens, or None.
    """
    inner = extract_model_from_parallel(model)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    params = inspect.signature(inner.forward).parameters
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    if "use_cache" in params:
        kwargs["use_cache"] = False
    decoder = inner.get_decoder()
    if decoder is inner:
        raise ValueError(f"{type(inner).__name__}: get_decoder() returns the model itself; "
                         "fastkd needs a causal LM with a separate decoder (base model)")
    store: dict[str, Any] = {}
    with record_output(decoder, store, "hidden"):
        model(**kwargs)
    return store["hidden"]
