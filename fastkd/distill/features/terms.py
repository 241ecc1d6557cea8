"""The feature-alignment terms of one batch and one teacher, each summed over the counted
tokens and averaged over the layer pairs.

Counted tokens are those that carry a target (the tokens the logit terms average over), so the
trainer divides every term by the same count and gradient accumulation stays exact. Per token:

- hidden / FFN (P the learned projection of the pair, x_t of width Ht):
  "relative_mse": ||P x_s - x_t||^2 / ||x_t||^2. Pre-norm residual streams grow with depth
  and training (RMS in the hundreds), so a plain MSE can swamp every other term; relative to
  the teacher it is scale-free and 1 for P x_s = 0.
  "mse": ||P x_s - x_t||^2 / Ht, the mean squared error over the features.
  "cosine": 1 - cos(P x_s, x_t).
- attention, same query-head counts: mean over heads of each query row's `attention_kd_loss`
  (MSE: the row's sum of squares over the L key columns / L; KL: KL(A_t row || A_s row)), the
  maps built from the layer's own softmax scale, causal, padded keys removed.
- attention, different query-head counts: MiniLMv2 relations. Queries, keys and values of each
  side are concatenated over heads and split into R relation heads; the Q-Q, K-K and V-V
  self-relations softmax(X X^T / sqrt(d_r)) are compared as above and averaged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from fastkd import attention_kd_loss

from .attention_capture import CapturedAttention
from .layer_map import LayerPairs
from .projections import FeatureProjections
from .settings import ATTENTION_LOSSES, FEATURE_LOSSES

_TINY = 1e-12  # guards the relative error of an all-zero teacher vector


def feature_term(
    student: Mapping[int, torch.Tensor],
    teacher: Mapping[int, torch.Tensor],
    pairs: LayerPairs,
    projections: FeatureProjections,
    teacher_index: int,
    kind: str,
    token_mask: torch.Tensor,
    loss: str = "relative_mse",
) -> torch.Tensor:
    """Hidden-state or FFN-output alignment through the learned projections.

    Args:
        student: student layer -> (B, T, Hs) features.
        teacher: teacher layer -> (B, T, Ht) features (constants).
        pairs: (student layer, teacher layer) pairs.
        projections: holds the (teacher_index, kind, pair) projections Hs -> Ht.
        teacher_index: which teacher's projections to use.
        kind: "hidden" or "ffn".
        token_mask: (B, T) bool, the counted tokens.
        loss: "relative_mse", "mse" or "cosine".

    Returns:
        fp32 scalar: sum over counted tokens of the per-token loss, mean over pairs.
    """
    if loss not in FEATURE_LOSSES:
        raise ValueError(f"unknown {kind} loss {loss!r}; expected one of {FEATURE_LOSSES}")
    total = token_mask.new_zeros((), dtype=torch.float32)
    for s, t in pairs:
        xs = projections(student[s], teacher_index, kind, s, t).float()
        xt = teacher[t].detach().float()
        if xs.shape != xt.shape:
            raise ValueError(f"{kind} pair ({s}, {t}): projected student features "
                             f"{tuple(xs.shape)} and teacher features {tuple(xt.shape)} differ")
        if loss == "relative_mse":
            per_token = (xs - xt).pow(2).sum(-1) / xt.pow(2).sum(-1).clamp_min(_TINY)
        elif loss == "mse":
            per_token = (xs - xt).pow(2).mean(-1)
        else:
            per_token = 1 - F.cosine_similarity(xs, xt, dim=-1)
        total = total + torch.where(token_mask, per_token, 0).sum()
    return total / len(pairs)


def attention_term(
    student: Mapping[int, CapturedAttention],
    teacher: Mapping[int, CapturedAttention],
    pairs: LayerPairs,
    attention_mask: torch.Tensor | None,
    token_mask: torch.Tensor,
    loss: str = "mse",
    relation_heads: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention alignment of each pair through `attention_kd_loss`.

    Args:
        student, teacher: layer -> captured q (B, H, L, D), k and v (B, H_kv, L, D).
        pairs: (student layer, teacher layer) pairs.
        attention_mask: (B, L) 1 = real token, or None (no padding).
        token_mask: (B, L) bool, the counted query rows.
        loss: "mse" or "kl".
        relation_heads: R, for pairs whose query-head counts differ (MiniLMv2 relations).
        backend: `attention_kd_loss` backend.

    Returns:
        fp32 scalar: sum over counted query rows of the per-row loss (mean over heads, and
        over the three relations where used), mean over pairs.
    """
    if loss not in ATTENTION_LOSSES:
        raise ValueError(f"unknown attention loss {loss!r}; expected one of {ATTENTION_LOSSES}")
    total = token_mask.new_zeros((), dtype=torch.float32)
    for s, t in pairs:
        a_s, a_t = student[s], teacher[t]
        if a_s.query.shape[1] == a_t.query.shape[1]:
            per_token = _rows(a_s.query, a_s.key, a_t.query, a_t.key, loss, attention_mask,
                              (a_s.scaling, a_t.scaling), backend)
        else:
            r = check_relation_heads(relation_heads, (s, t), _widths(a_s), _widths(a_t))
            per_token = sum(
                _rows(xs, xs, xt, xt, loss, attention_mask, (None, None), backend)
                for xs, xt in zip(_relation_inputs(a_s, r), _relation_inputs(a_t, r), strict=True)
            ) / 3
        total = total + torch.where(token_mask, per_token, 0).sum()
    return total / len(pairs)


def check_relation_heads(
    relation_heads: int | None, pair: tuple[int, int], student_widths: dict[str, int],
    teacher_widths: dict[str, int],
) -> int:
    """R, or `ValueError` when it is unset or does not divide every q / k / v width
    (heads x head dim) of both sides."""
    if relation_heads is None:
        raise ValueError(
            f"attention pair {pair}: student and teacher query-head counts differ; set "
            "relation_heads (R) to align MiniLMv2 relation heads instead of attention maps"
        )
    widths = {f"student {k}": v for k, v in student_widths.items()}
    widths.update({f"teacher {k}": v for k, v in teacher_widths.items()})
    bad = {k: v for k, v in widths.items() if relation_heads < 1 or v % relation_heads}
    if bad:
        which = "divides none of them" if len(bad) == len(widths) else f"does not divide {bad}"
        raise ValueError(f"relation_heads={relation_heads} must divide both sides' q / k / v "
                         f"widths (heads x head dim) {widths}; it {which}")
    return relation_heads


def _widths(a: CapturedAttention) -> dict[str, int]:
    return {name: x.shape[1] * x.shape[3]
            for name, x in (("q", a.query), ("k", a.key), ("v", a.value))}


def _relation_inputs(a: CapturedAttention, r: int) -> list[torch.Tensor]:
    """q, k, v (B, heads, L, D) -> each (B, R, L, heads * D / R)."""
    return [x.transpose(1, 2).flatten(2).unflatten(-1, (r, -1)).transpose(1, 2)
            for x in (a.query, a.key, a.value)]


def _rows(
    q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, loss: str,
    attention_mask: torch.Tensor | None, scales: tuple[float | None, float | None],
    backend: str,
) -> torch.Tensor:
    """(B, L) per-query-row loss, mean over heads (MSE divided by the L key columns)."""
    rows = attention_kd_loss(q_s, k_s, q_t.detach(), k_t.detach(), loss=loss, causal=True,
                             attention_mask=attention_mask, student_scale=scales[0],
                             teacher_scale=scales[1], reduction="none", backend=backend)
    per_token = rows.float().mean(1)
    return per_token / q_s.shape[2] if loss == "mse" else per_token
