"""How much each teacher's feature terms count in a multi-teacher run."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .settings import WEIGHTINGS


def normalized_priors(priors: Sequence[float] | None, n_teachers: int) -> torch.Tensor:
    """(K,) priors divided by their sum (uniform when None)."""
    if priors is None:
        return torch.full((n_teachers,), 1.0 / n_teachers)
    if len(priors) != n_teachers or any(p < 0 for p in priors) or sum(priors) <= 0:
        raise ValueError(f"teacher_priors {list(priors)} must be {n_teachers} non-negative "
                         "values with a positive sum")
    pi = torch.tensor(priors, dtype=torch.float32)
    return pi / pi.sum()


def teacher_feature_weights(
    mixing: torch.Tensor | None,
    token_mask: torch.Tensor,
    weighting: str,
    priors: Sequence[float] | None,
    n_teachers: int,
) -> torch.Tensor:
    """(K,) fp32 constant weight of each teacher's feature terms on this batch.

    Args:
        mixing: (B, T, K) per-token mixing weights of the logit loss (several teachers), or
            None (one teacher).
        token_mask: (B, T) bool, the counted tokens.
        weighting: "entropy": each teacher's mean mixing weight over the counted tokens (its
            prior when no token counts); "static": its normalized prior.
        priors: teacher priors, or None for uniform.
        n_teachers: K.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    device = token_mask.device
    if n_teachers == 1:
        return torch.ones(1, device=device)
    pi = normalized_priors(priors, n_teachers).to(device)
    if weighting == "static":
        return pi
    if mixing is None or mixing.shape != (*token_mask.shape, n_teachers):
        shape = None if mixing is None else tuple(mixing.shape)
        raise ValueError(f"entropy weighting of {n_teachers} teachers needs mixing weights of "
                         f"shape {(*token_mask.shape, n_teachers)}, got {shape}")
    counted = token_mask.sum()
    if counted == 0:
        return pi
    w = torch.where(token_mask.unsqueeze(-1), mixing.detach().float(), 0).sum(dim=(0, 1))
    return w / counted
