"""Held-out cross-entropy and perplexity of a causal LM."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .loss import IGNORE_INDEX, shift_labels


@torch.no_grad()
def mean_cross_entropy(
    model: nn.Module,
    examples: Sequence[dict[str, Any]],
    collate: Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]],
    batch_size: int = 16,
) -> float:
    """Mean next-token cross-entropy (nats) over all counted tokens of `examples`.

    Args:
        model: a causal LM whose forward takes input_ids, attention_mask and labels and returns
            the mean shifted cross-entropy as `.loss` (it materializes one batch's logits).
        examples: rows with `input_ids`.
        collate: turns a list of rows into a batch (input_ids, attention_mask, labels).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate([examples[i] for i in range(start, min(start + batch_size,
                                                                 len(examples)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((shift_labels(batch["labels"]) != IGNORE_INDEX).sum())
        if n:
            total += float(model(**batch).loss) * n
            count += n
    model.train(was_training)
    if count == 0:
        raise ValueError("perplexity: no counted tokens in the evaluation data")
    return total / count


def perplexity(
    model: nn.Module,
    examples: Sequence[dict[str, Any]],
    collate: Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]],
    batch_size: int = 16,
) -> float:
    """exp(`mean_cross_entropy`) over all counted tokens of `examples`."""
    return math.exp(mean_cross_entropy(model, examples, collate, batch_size))
