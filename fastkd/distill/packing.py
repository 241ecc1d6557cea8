"""Packed sequences with document boundaries: position ids that restart at each document and a
4-D block-diagonal causal attention mask, so no token attends across documents.

transformers 5.24's eager and sdpa paths on CPU do not infer document boundaries from
restarting `position_ids` alone (attention still crosses documents), so the boundary is given
as an additive float mask (0 where allowed, -inf elsewhere) in the model's dtype; a boolean
4-D mask is read differently by the eager path and is not used.
"""

from __future__ import annotations

import torch


def restart_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document index of each token (non-decreasing along T) -> (B, T) position ids
    counting from 0 at each document's first token."""
    if doc_ids.dim() != 2:
        raise ValueError(f"doc_ids must be (B, T), got shape {tuple(doc_ids.shape)}")
    t = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values
    return t - first


def block_causal_mask(doc_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) document index of each token -> (B, 1, T, T) additive mask: 0 where query t may
    attend key s (s <= t, same document), -inf elsewhere."""
    if doc_ids.dim() != 2:
        raise ValueError(f"doc_ids must be (B, T), got shape {tuple(doc_ids.shape)}")
    width = doc_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=doc_ids.device).tril()
    allowed = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=doc_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
