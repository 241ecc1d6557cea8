"""Learned bias-free projections from the student's width to each teacher's width.

One `nn.Linear(Hs, Ht_k, bias=False)` per teacher k, aligned feature kind ("hidden", "ffn") and
layer pair. They train with the student but are not part of it: they live in their own module,
are saved beside each checkpoint as `feature_projections.safetensors` and restored on resume,
and are left out of the exported student model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .layer_map import LayerPairs

FILE_NAME = "feature_projections.safetensors"


class FeatureProjections(nn.Module):
    """Projections student width -> teacher width for every (teacher, kind, layer pair).

    Args:
        student_width: Hs.
        teacher_widths: Ht_k for each teacher k.
        pairs: the (student layer, teacher layer) pairs of each teacher.
        kinds: the feature kinds that need projections ("hidden", "ffn").
    """

    def __init__(
        self,
        student_width: int,
        teacher_widths: Sequence[int],
        pairs: Sequence[LayerPairs],
        kinds: Sequence[str],
    ) -> None:
        super().__init__()
        if len(teacher_widths) != len(pairs):
            raise ValueError(f"{len(teacher_widths)} teacher widths for {len(pairs)} pair lists")
        self.projections = nn.ModuleDict({
            self.key(k, kind, s, t): nn.Linear(student_width, width, bias=False)
            for k, (width, teacher_pairs) in enumerate(zip(teacher_widths, pairs, strict=True))
            for kind in kinds for s, t in teacher_pairs
        })

    @staticmethod
    def key(teacher: int, kind: str, student_layer: int, teacher_layer: int) -> str:
        return f"teacher{teacher}_{kind}_{student_layer}_{teacher_layer}"

    def forward(
        self, x: torch.Tensor, teacher: int, kind: str, student_layer: int, teacher_layer: int
    ) -> torch.Tensor:
        """(..., Hs) student features -> (..., Ht) in the teacher's space (fp32 weights; the
        input is cast to their dtype)."""
        layer = self.projections[self.key(teacher, kind, student_layer, teacher_layer)]
        return layer(x.to(layer.weight.dtype))

    def save(self, directory: str | Path) -> Path:
        """Write the weights to `directory/feature_projections.safetensors`; returns the path."""
        path = Path(directory) / FILE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(path))
        return path

    def load(self, directory: str | Path) -> None:
        """Restore weights saved by `save`; `FileNotFoundError` when the file is missing and
        `ValueError` when its keys or shapes differ from this module's."""
        path = Path(directory) / FILE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no feature projections in {str(directory)!r} "
                                    f"(expected {FILE_NAME})")
        saved = load_file(str(path))
        own = self.state_dict()
        if saved.keys() != own.keys() or any(saved[k].shape != own[k].shape for k in own):
            raise ValueError(
                f"{path}: saved projections {_shapes(saved)} do not match this run's "
                f"{_shapes(own)} (different models, layer map or feature terms?)"
            )
        self.load_state_dict(saved)


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sorted(tensors.items())}
