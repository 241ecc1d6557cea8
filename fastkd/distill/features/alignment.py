"""`FeatureAlignment`: the hidden-state, attention and feed-forward terms of a distillation run,
with their layer mapping, captures and learned projections.

Every input a term with weight > 0 needs is checked when the object is built (layer pairs in
range, decoder layers and MLP modules found, attention routed through transformers' registry,
relation heads dividing both sides' widths), before any training step.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers import PretrainedConfig

from .attention_capture import enable_attention_capture
from .capture import FeatureRequest, Features, record_features
from .layer_capture import decoder_layers, layer_module
from .layer_map import LayerPairs, describe, layer_pairs
from .projections import FeatureProjections
from .settings import TERMS, FeatureSettings
from .teacher_weights import teacher_feature_weights
from .terms import attention_term, check_relation_heads, feature_term


class FeatureAlignment(nn.Module):
    """The feature terms of one student and its teachers; holds the learned projections.

    Args:
        settings: term weights and options; at least one weight > 0.
        student: the student causal LM (possibly wrapped).
        teachers: the teacher causal LMs, in the order of the logit loss's teachers.

    Attention alignment switches the student and every teacher to the capturing attention
    implementation ("fastkd_capture": SDPA attention that records q, k, v when asked).
    """

    def __init__(
        self, settings: FeatureSettings, student: nn.Module, teachers: Sequence[nn.Module]
    ) -> None:
        super().__init__()
        if not settings.active:
            raise ValueError("FeatureAlignment needs a feature term with weight > 0")
        self.settings = settings
        depth = len(decoder_layers(student))
        self.pairs: list[LayerPairs] = [
            layer_pairs(settings.layer_map, depth, len(decoder_layers(t))) for t in teachers
        ]
        kinds = [k for k in ("hidden", "ffn") if settings.weight(k) > 0]
        self.projections = FeatureProjections(
            _text_config(student).hidden_size, [_text_config(t).hidden_size for t in teachers],
            self.pairs, kinds,
        )
        if settings.ffn_weight > 0:
            for model, layers in self._layers(student, teachers):
                for index in layers:
                    layer_module(model, index, "mlp")
        if settings.attention_weight > 0:
            for model, _ in self._layers(student, teachers):
                enable_attention_capture(model)
            heads_s, widths_s = _attention_widths(student)
            for teacher, pairs in zip(teachers, self.pairs, strict=True):
                heads_t, widths_t = _attention_widths(teacher)
                if heads_s != heads_t:
                    check_relation_heads(settings.relation_heads, pairs[0], widths_s, widths_t)

    def _layers(
        self, student: nn.Module, teachers: Sequence[nn.Module]
    ) -> list[tuple[nn.Module, set[int]]]:
        """(model, its mapped layers) for the student and each teacher."""
        students = {s for pairs in self.pairs for s, _ in pairs}
        own = [{j for _, j in pairs} for pairs in self.pairs]
        return [(student, students), *zip(teachers, own, strict=True)]

    def describe(self) -> str:
        """The layer mapping of each teacher, one line each (printed at the start of a run)."""
        return "\n".join(f"teacher {k}: {describe(p)}" for k, p in enumerate(self.pairs))

    def _request(self, layers: set[int]) -> FeatureRequest:
        chosen = tuple(sorted(layers))
        return FeatureRequest(**{t: chosen if self.settings.weight(t) > 0 else () for t in TERMS})

    def record_student(self, model: nn.Module) -> AbstractContextManager[Features]:
        """Capture the student's mapped layers during the forward run inside the block."""
        return record_features(model, self._request({s for p in self.pairs for s, _ in p}))

    def record_teacher(self, k: int, model: nn.Module) -> AbstractContextManager[Features]:
        """Capture teacher k's mapped layers during the forward run inside the block."""
        return record_features(model, self._request({t for _, t in self.pairs[k]}))

    def forward(
        self,
        student: Features,
        teachers: Sequence[Features],
        attention_mask: torch.Tensor | None,
        token_mask: torch.Tensor,
        mixing: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of the active terms, and each term's value.

        Args:
            student, teachers: features recorded by `record_student` / `record_teacher`.
            attention_mask: (B, T) 1 = real token, or None.
            token_mask: (B, T) bool, the counted tokens (those with a target).
            mixing: (B, T, K) mixing weights of the logit loss (several teachers), or None.

        Returns:
            (sum over terms of weight x term, {term: value}); each term is the sum over the
            counted tokens of its per-token loss, mean over layer pairs, summed over teachers
            with `teacher_feature_weights`. fp32 scalars.
        """
        s = self.settings
        w = teacher_feature_weights(mixing, token_mask, s.weighting, s.teacher_priors,
                                    len(teachers))
        parts: dict[str, torch.Tensor] = {}
        for term in s.active:
            values = []
            for k, (feats, pairs) in enumerate(zip(teachers, self.pairs, strict=True)):
                if term == "attention":
                    values.append(attention_term(
                        student.attention, feats.attention, pairs, attention_mask, token_mask,
                        s.attention_loss, s.relation_heads, s.backend))
                else:
                    values.append(feature_term(
                        getattr(student, term), getattr(feats, term), pairs, self.projections,
                        k, term, token_mask, getattr(s, f"{term}_loss")))
            parts[term] = (torch.stack(values) * w).sum()
        total = sum(s.weight(term) * value for term, value in parts.items())
        return total, parts


def _text_config(model: nn.Module) -> PretrainedConfig:
    """The (text) config of a possibly wrapped model."""
    return extract_model_from_parallel(model).config.get_text_config()


def _attention_widths(model: nn.Module) -> tuple[int, dict[str, int]]:
    """Query-head count and q / k / v widths (heads x head dim) from the model's config."""
    config = _text_config(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, {"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim}
