"""Held-out perplexity of a causal LM, and evaluation during training (`eval_steps`).

`HeldOutEvaluation` computes the student's held-out KD loss, cross-entropy and perplexity every
N steps (and the teachers' cross-entropy and perplexity once), logged like the training metrics
(metrics.jsonl and `report_to`); with `save_best` the best student so far is kept in
output_dir/best, chosen by held-out KD loss or perplexity (lower is better).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from fastkd import fused_kd_loss

from .capture import loss_in_forward
from .heads import Head, vocab_rows
from .loss import IGNORE_INDEX, shift_labels

logger = logging.getLogger(__name__)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    examples: Sequence[dict[str, Any]],
    collate: Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]],
    batch_size: int = 16,
) -> float:
    """exp(mean next-token cross-entropy over all counted tokens of `examples`).

    Args:
        model: a causal LM whose forward takes input_ids, attention_mask and labels and returns
            the mean shifted cross-entropy as `.loss`.
        examples: rows with `input_ids`.
        collate: turns a list of rows into a batch (input_ids, attention_mask, labels, and
            position_ids for packed rows).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate([examples[i] for i in range(start, min(start + batch_size,
                                                                 len(examples)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        if "position_ids" in batch:  # packed rows: attention kept inside each document
            batch["attention_mask"] = None  # (transformers reads packed rows only without a
            batch["use_cache"] = False  # 2-D mask and without a KV cache)
        n = int((shift_labels(batch["labels"]) != IGNORE_INDEX).sum())
        if n:
            total += float(model(**batch).loss) * n
            count += n
    model.train(was_training)
    if count == 0:
        raise ValueError("perplexity: no counted tokens in the evaluation data")
    return math.exp(total / count)


class HeldOutEvaluation(TrainerCallback):
    """Evaluates `trainer`'s student on `examples` every `every` optimizer steps and at the
    last step.

    Args:
        trainer: the `DistillationTrainer` (its loss is the held-out KD loss).
        examples: held-out rows with `input_ids`.
        collate: rows -> batch (input_ids, attention_mask, labels).
        every: evaluate every this many steps.
        batch_size: rows per evaluation batch.
        best_dir: where to keep the best student (None: keep none).
        best_metric: "eval_kd_loss" or "eval_perplexity".
        save_extra: called with best_dir after the best student is saved (the tokenizer).
    """

    def __init__(self, trainer: Any, examples: Sequence[dict[str, Any]],
                 collate: Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]],
                 every: int, batch_size: int, best_dir: Path | None = None,
                 best_metric: str = "eval_kd_loss",
                 save_extra: Callable[[Path], None] | None = None) -> None:
        self.trainer, self.examples, self.collate = trainer, examples, collate
        self.every, self.batch_size = every, batch_size
        self.best_dir, self.best_metric, self.save_extra = best_dir, best_metric, save_extra
        self.teacher_logged = False
        self.best = math.inf
        record = None if best_dir is None else best_dir / "best.json"
        if record is not None and record.is_file():  # a resumed run keeps its best so far
            self.best = json.loads(record.read_text())[best_metric]

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if state.global_step % self.every and state.global_step != state.max_steps:
            return
        metrics = self.evaluate()
        training_log_due = control.should_log  # Trainer.log clears it: keep this step's log
        self.trainer.log(metrics)
        control.should_log = training_log_due
        if self.best_dir is not None and metrics[self.best_metric] < self.best:
            self.best = metrics[self.best_metric]
            self._save_best(state.global_step, metrics)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """eval_kd_loss (the training objective per counted held-out token), eval_ce and
        eval_perplexity of the student; at the first call also the teachers' CE and
        perplexity (eval_teacher_ce, or eval_teacher{k}_ce for several)."""
        model = self.trainer.model
        was_training = model.training
        model.eval()
        device = self.trainer.args.device
        total, count = 0.0, 0
        ce_sum = 0.0
        for batch in self._batches(device):
            loss_sum, counted = self.trainer.distill_loss_sum(model, batch)
            total += float(loss_sum)
            count += int(counted)
            ce_sum += self._cross_entropy_sum(model, batch)
        if count == 0:
            raise ValueError("evaluation: no counted tokens in eval_data")
        ce = ce_sum / count
        model.train(was_training)
        metrics = {"eval_kd_loss": total / count, "eval_ce": ce,
                   "eval_perplexity": math.exp(ce)}
        if not self.teacher_logged:
            teachers = self.trainer.teachers
            for k, teacher in enumerate(teachers):
                name = "eval_teacher" if len(teachers) == 1 else f"eval_teacher{k}"
                teacher_ce = sum(self._cross_entropy_sum(teacher, batch)
                                 for batch in self._batches(device)) / count
                metrics[f"{name}_ce"] = teacher_ce
                metrics[f"{name}_perplexity"] = math.exp(teacher_ce)
            self.teacher_logged = True
        return metrics

    def _cross_entropy_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
        """Next-token cross-entropy of `model` summed over the batch's counted tokens, from
        its hidden states and lm_head (all its rows) by the fused loss: no tokens x vocab
        logits (soft-capped or scaled as the model emits them: the head's transform). The model
        is its own teacher with soft_weight 0, so only the CE term counts."""
        targets = shift_labels(batch["labels"])
        backend = self.trainer.kd.backend

        def cross_entropy(hidden: torch.Tensor, head: Head) -> torch.Tensor:
            weight = head.weight.to(hidden.dtype)
            return fused_kd_loss(hidden, weight, hidden, weight, targets,
                                 student_bias=head.bias, teacher_bias=head.bias,
                                 student_softcap=head.softcap, teacher_softcap=head.softcap,
                                 student_logit_scale=head.scale,
                                 teacher_logit_scale=head.scale, soft_weight=0.0,
                                 hard_weight=1.0, ignore_index=IGNORE_INDEX,
                                 reduction="sum", backend=backend)

        return float(loss_in_forward(model, batch["input_ids"], batch.get("attention_mask"),
                                     vocab_rows(model), cross_entropy,
                                     batch.get("position_ids")))

    def _batches(self, device: torch.device):
        for start in range(0, len(self.examples), self.batch_size):
            rows = [self.examples[i]
                    for i in range(start, min(start + self.batch_size, len(self.examples)))]
            yield {k: v.to(device) for k, v in self.collate(rows).items()}

    def _save_best(self, step: int, metrics: dict[str, float]) -> None:
        assert self.best_dir is not None
        self.trainer.save_model(str(self.best_dir))
        if self.trainer.is_world_process_zero():
            if self.save_extra is not None:
                self.save_extra(self.best_dir)
            (self.best_dir / "best.json").write_text(json.dumps({"step": step, **metrics}))
            logger.info("best student so far (step %d, %s %.4f) saved in %s", step,
                        self.best_metric, metrics[self.best_metric], self.best_dir)
