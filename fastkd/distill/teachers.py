"""Where the trainer's teacher signals come from: teacher models run on each batch
(`LiveTeachers`), or captures on disk read by token block (`CapturedTeachers`). Both give the
trainer a batch's teacher signals and the logit loss against them; the trainer is the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from .capture import final_hidden
from .heads import Head, output_head, vocab_rows
from .loss import IGNORE_INDEX, LogitKD
from .signals import CapturedSignals
from .vocab import teacher_rows


class LiveTeachers:
    """Frozen teacher models, run under no_grad on each batch to their final hidden states.

    Args:
        models: causal LMs sharing the student's tokenizer (lm_heads may have padding rows;
            each head keeps its model's logit transform, `heads.logit_transform`).
        student_rows: rows V of the student's lm_head; vocab_size: the tokenizer's length or
            None. device: where the teachers run.
    """

    def __init__(self, models: Sequence[PreTrainedModel], student_rows: int,
                 vocab_size: int | None, device: torch.device) -> None:
        self.models = list(models)
        self.heads: list[Head] = []
        for k, teacher in enumerate(self.models):
            name = getattr(teacher, "name_or_path", "") or f"teacher {k}"
            teacher.to(device).eval().requires_grad_(False)
            used = teacher_rows(student_rows, vocab_rows(teacher), vocab_size, name)
            # with the teacher's logit transform; one fastkd does not read is refused
            self.heads.append(output_head(teacher, used, name))

    @torch.no_grad()
    def batch(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """K (B, T, Ht_k) final hidden states."""
        return [final_hidden(t, inputs["input_ids"], inputs.get("attention_mask"),
                             inputs.get("position_ids"))
                for t in self.models]

    def loss(self, kd: LogitKD, student_hidden: torch.Tensor, student: Head,
             signals: list[torch.Tensor], targets: torch.Tensor,
             return_parts: bool = False) -> tuple[torch.Tensor, ...]:
        """`kd`'s summed loss and mixing weights, and with ``return_parts`` its `LogitParts`
        (see `LogitKD.__call__`)."""
        return kd(student_hidden, student, signals, self.heads, targets, return_parts)


def check_captures(captures: Sequence[CapturedSignals], kd: LogitKD, student_rows: int) -> str:
    """Raise `ValueError` unless the captures can train this student with `kd`; returns their
    kind. Several teachers need hidden captures: the top-k supports of two teachers differ
    from token to token, so neither their mixture nor per-teacher KLs over one bucketed tail
    are exact."""
    names = ", ".join(repr(str(c.folder)) for c in captures)
    kinds = {c.meta.kind for c in captures}
    if not kinds:
        raise ValueError("teacher_signals names no capture")
    if len(kinds) > 1:
        raise ValueError(f"teacher_signals mixes topk and hidden captures ({names}); several "
                         "teachers need hidden captures of each")
    for c in captures:
        if c.meta.vocab_size != student_rows:
            raise ValueError(f"teacher_signals {str(c.folder)!r} holds {c.meta.vocab_size} "
                             f"vocabulary rows, the student's lm_head {student_rows}")
    kind = kinds.pop()
    if kind == "topk":
        if len(captures) > 1:
            raise ValueError(f"several topk captures ({names}): their top-k supports differ "
                             "from token to token, so neither the mixture nor per-teacher KLs "
                             "over one bucketed tail are exact; capture the teachers with "
                             "--kind hidden for multi-teacher distillation")
        if kd.divergence not in ("kl", "reverse_kl"):
            raise ValueError(f"divergence {kd.divergence!r} needs the teacher's full "
                             "distribution; a topk capture trains with 'kl' or 'reverse_kl' "
                             "(or capture --kind hidden)")
        captures[0].temperature_column(kd.temperature)
    return kind


class CapturedTeachers:
    """Teacher signals read from captures (`fastkd capture`), by each batch's token block
    indices (`row_index`, which the collator passes on): the alignment holds whatever the
    order of the batches (shuffling, DDP ranks, gradient accumulation, resume).

    hidden captures: the stored final hidden states and lm_head, through `LogitKD` exactly as
    live teachers (several: multi-teacher). topk: one capture, through `LogitKD.sparse`.

    Args:
        captures: opened captures, checked against the run (`signals.check_capture`).
        kd: the loss settings (its temperature must be served by a topk capture).
        student_rows: rows V of the student's lm_head. device: where the signals go.
    """

    def __init__(self, captures: Sequence[CapturedSignals], kd: LogitKD, student_rows: int,
                 device: torch.device) -> None:
        self.captures, self.device = list(captures), device
        self.models: list[PreTrainedModel] = []
        self.kind = check_captures(self.captures, kd, student_rows)
        if self.kind == "topk":
            self.lse_column = self.captures[0].temperature_column(kd.temperature)
            self.heads: list[Head] = []
        else:
            self.heads = [_to(c.head(), device) for c in self.captures]

    def batch(self, inputs: dict[str, torch.Tensor]) -> Any:
        """The batch's signals, laid out like its (B, T) tokens (zeros at padding): topk: ids
        (B, T, k) int64, logits (B, T, k) float32, lse (B, T); hidden: K (B, T, H_k) in the
        dtype of each stored lm_head. Refuses a batch whose tokens differ from the capture's."""
        if "row_index" not in inputs:
            raise ValueError("training from teacher_signals needs each batch's row_index (the "
                             "token block indices): add a row_index column to the dataset")
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        lengths = ids.new_full((ids.shape[0],), ids.shape[1]) if mask is None else mask.sum(1)
        rows = inputs["row_index"].tolist()
        if self.kind == "topk":
            (capture,) = self.captures
            k = capture.meta.k
            out = {"ids": torch.zeros(*ids.shape, k, dtype=torch.int64),
                   "logits": torch.zeros(*ids.shape, k, dtype=torch.float32),
                   "lse": torch.zeros(ids.shape, dtype=torch.float32)}
            for b, row in enumerate(rows):
                stored = self._row(capture, row, ids[b], int(lengths[b]))
                n = int(lengths[b])
                out["ids"][b, :n] = stored["ids"]
                out["logits"][b, :n] = stored["logits"].float()
                out["lse"][b, :n] = stored["lse"][:, self.lse_column]
            return {name: t.to(self.device) for name, t in out.items()}
        hiddens = []
        for capture, head in zip(self.captures, self.heads, strict=True):
            hidden = torch.zeros(*ids.shape, capture.meta.hidden_size, dtype=head.weight.dtype)
            for b, row in enumerate(rows):
                n = int(lengths[b])
                hidden[b, :n] = self._row(capture, row, ids[b], n)["hidden"]
            hiddens.append(hidden.to(self.device))
        return hiddens

    @staticmethod
    def _row(capture: CapturedSignals, row: int, ids: torch.Tensor,
             length: int) -> dict[str, torch.Tensor]:
        stored = capture.row(row)
        if not torch.equal(stored["input_ids"].long(), ids[:length].cpu()):
            raise ValueError(f"teacher_signals {str(capture.folder)!r}: token block {row} of "
                             "the capture holds other tokens than this batch's row (is the "
                             "data, or its order, not the capture's?)")
        return stored

    def loss(self, kd: LogitKD, student_hidden: torch.Tensor, student: Head, signals: Any,
             targets: torch.Tensor, return_parts: bool = False) -> tuple[torch.Tensor, ...]:
        """`kd`'s summed loss and mixing weights (None for one teacher), and with
        ``return_parts`` its `LogitParts` (see `LogitKD.__call__`)."""
        if self.kind == "hidden":
            return kd(student_hidden, student, signals, self.heads, targets, return_parts)
        keep = targets != IGNORE_INDEX
        out = kd.sparse(student_hidden[keep], student, signals["ids"][keep],
                        signals["logits"][keep], signals["lse"][keep], targets[keep],
                        return_parts)
        return (out[0], None, out[1]) if return_parts else (out, None)


def _to(head: Head, device: torch.device) -> Head:
    return dataclasses.replace(head, weight=head.weight.to(device),
                               bias=None if head.bias is None else head.bias.to(device))
