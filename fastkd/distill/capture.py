"""Run a causal LM to its final hidden state without computing its full logits.

The model is called through its own forward (so DDP / FSDP wrappers see the call) with
`logits_to_keep=1`; a forward hook on the decoder records the decoder's output, the final-norm
hidden state that the lm_head reads. Further captures (intermediate layers, attention inputs)
hook in the same way. For the student, `loss_in_forward` computes the loss inside that forward,
where the lm_head weight is whole even under FSDP.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from .heads import Head, output_head
from .packing import flash_varlen_kwargs


@contextmanager
def forward_hook(module: nn.Module, hook: Callable[..., Any]):
    """While active, `hook(module, args, output)` runs after each `module` call, before the
    module's other forward hooks (FSDP's, which reshard); a non-None return value replaces the
    output."""
    handle = module.register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def record_output(module: nn.Module, store: dict[str, Any], key: str):
    """While active, `store[key]` receives the first output tensor of each `module` call."""

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        store[key] = output if torch.is_tensor(output) else output[0]

    with forward_hook(module, hook):
        yield store


def final_hidden(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, T, H) final hidden state of `model` (a causal LM, possibly wrapped) on a batch.

    Args:
        model: a `*ForCausalLM` model or a DDP / FSDP / compiled wrapper of one.
        input_ids: (B, T) token ids.
        attention_mask: (B, T) 1 for real tokens, or None.
        position_ids: (B, T) positions restarting at each packed document, or None.
    """
    inner = extract_model_from_parallel(model)
    store: dict[str, Any] = {}
    with record_output(_decoder(inner), store, "hidden"):
        model(**_forward_kwargs(inner, input_ids, attention_mask, position_ids))
    return store["hidden"]


def loss_in_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    rows: int,
    loss_fn: Callable[[torch.Tensor, Head], torch.Tensor],
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``loss_fn(hidden, head)`` computed inside `model`'s forward, returned as its output.

    hidden is the (B, T, H) final hidden state and head the first `rows` rows of the lm_head,
    with the model's logit transform (`heads.logit_transform`). The loss is computed when the
    lm_head runs, where the lm_head weight is whole even under FSDP (outside the forward it may
    be in shards), and replaces the model's output "logits" as the model returns (a forward
    hook on the model that runs before FSDP's own, so that the loss is an output of the sharded
    root module and FSDP gathers the root's parameters again before the backward runs through
    them). Autocast is off inside: logits are never rounded to the autocast dtype. The model's
    emitted logits (of the last position only, `logits_to_keep=1`) must be f(lm_head output)
    for the head's transform f: a model whose forward changes its logits otherwise (a
    multiplier fastkd does not read, slicing, or no lm_head call) raises `ValueError`, since
    the loss would not be that of its logits.
    """
    inner = extract_model_from_parallel(model)
    store: dict[str, Any] = {}
    losses: list[torch.Tensor] = []

    @torch.compiler.disable  # Python-side bookkeeping; the loss runs its own kernels
    def head_hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
        store["head"] = head = output_head(inner, rows)
        store["head_output"] = output
        with torch.autocast(output.device.type, enabled=False):
            losses.append(loss_fn(store["hidden"], head))

    @torch.compiler.disable
    def emit_loss(_module: nn.Module, _args: Any, out: Any) -> Any:
        if len(losses) != 1 or not _emits(store["head"], store["head_output"], _logits(out)):
            raise ValueError(
                f"{type(inner).__name__}: its logits are not its lm_head's output (the lm_head "
                f"ran {len(losses)} times, or the forward changes its output: a multiplier, "
                "soft-capping or slicing other than the logit transform fastkd reads for it); "
                "fastkd distils logits = f(lm_head(hidden)) exactly"
            )
        if isinstance(out, Mapping):
            out["logits"] = losses[0]
            return out
        return (losses[0], *out[1:])

    with record_output(_decoder(inner), store, "hidden"), \
            forward_hook(inner.get_output_embeddings(), head_hook), \
            forward_hook(inner, emit_loss):
        out = model(**_forward_kwargs(inner, input_ids, attention_mask, position_ids))
    return _logits(out)


def _emits(head: Head, head_output: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether `logits` (what the model returned) are head.emitted(head_output), up to the
    rounding of the transform in the coarser of the two dtypes (a few units in its last place:
    the model may divide where f multiplies, and accelerate's mixed precision hands the logits
    back converted to fp32)."""
    if logits is head_output:
        return head.plain
    if logits.shape != head_output.shape:
        return False
    expected = head.emitted(head_output.detach().double())
    tol = 8 * max(torch.finfo(logits.dtype).eps, torch.finfo(head_output.dtype).eps)
    return torch.allclose(logits.detach().double(), expected, rtol=tol,
                          atol=tol * float(expected.abs().max()))


def _logits(out: Any) -> torch.Tensor:
    return out["logits"] if isinstance(out, Mapping) else out[0]


def _decoder(inner: nn.Module) -> nn.Module:
    decoder = inner.get_decoder()
    if decoder is inner:
        raise ValueError(f"{type(inner).__name__}: get_decoder() returns the model itself; "
                         "fastkd needs a causal LM with a separate decoder (base model)")
    return decoder


def _forward_kwargs(
    inner: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Forward arguments that skip the full logits (`logits_to_keep=1`) and the KV cache.

    Packed rows (`position_ids` given) go without the 2-D attention mask: transformers then
    reads the restarting positions as packed sequences (see `fastkd.distill.packing`).
    """
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    # a peft model's forward takes **kwargs and hands them to its base model: read that one's
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    params = inspect.signature(base.forward).parameters
    if position_ids is not None:
        if "position_ids" not in params:
            raise ValueError(f"{type(base).__name__}: its forward takes no position_ids, so "
                             "packed documents would attend to each other; set packing: false")
        kwargs.update(position_ids=position_ids, attention_mask=None)
        if "flash" in str(getattr(base.config, "_attn_implementation", "")):
            kwargs.update(flash_varlen_kwargs(position_ids))
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return kwargs
