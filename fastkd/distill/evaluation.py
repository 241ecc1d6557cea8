"""Evaluation during training (`eval_steps`): the student's held-out KD loss, cross-entropy and
perplexity every N steps (and the teachers' cross-entropy and perplexity once), logged like the
training metrics (metrics.jsonl and `report_to`); with `save_best` the best student so far is
kept in output_dir/best, chosen by held-out KD loss or perplexity (lower is better)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .evaluate import mean_cross_entropy

logger = logging.getLogger(__name__)


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
        for batch in self._batches(device):
            loss_sum, counted = self.trainer.distill_loss_sum(model, batch)
            total += float(loss_sum)
            count += int(counted)
        if count == 0:
            raise ValueError("evaluation: no counted tokens in eval_data")
        ce = mean_cross_entropy(model, self.examples, self.collate, self.batch_size)
        model.train(was_training)
        metrics = {"eval_kd_loss": total / count, "eval_ce": ce,
                   "eval_perplexity": math.exp(ce)}
        if not self.teacher_logged:
            teachers = self.trainer.teachers
            for k, teacher in enumerate(teachers):
                name = "eval_teacher" if len(teachers) == 1 else f"eval_teacher{k}"
                teacher_ce = mean_cross_entropy(teacher, self.examples, self.collate,
                                                self.batch_size)
                metrics[f"{name}_ce"] = teacher_ce
                metrics[f"{name}_perplexity"] = math.exp(teacher_ce)
            self.teacher_logged = True
        return metrics

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
