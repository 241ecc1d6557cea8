"""A distillation run on local checkpoints and data: every check first, then training."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DistillConfig
from .data import CausalCollator, load_texts, tokenize
from .evaluate import perplexity
from .features import FeatureSettings
from .loss import LogitKD
from .metrics import JsonlLogger
from .models import (
    check_seq_len,
    check_teacher_tokenizers,
    existing,
    load_config,
    load_model,
    load_tokenizer,
)
from .trainer import DistillationTrainer
from .training import training_arguments

logger = logging.getLogger(__name__)


@dataclass
class PreparedRun:
    """A trainer whose inputs all passed their checks, and what to do after training."""

    trainer: DistillationTrainer
    resume: str | bool | None
    finish: Callable[[], dict[str, float]]

    def __call__(self) -> dict[str, float]:
        self.trainer.train(resume_from_checkpoint=self.resume)
        return self.finish()


def prepare(cfg: DistillConfig) -> PreparedRun:
    """Load and check models, tokenizers and data; raise before any training step on bad
    input (missing paths, mismatched vocabularies, empty data, seq_len too long)."""
    if cfg.student is None or not cfg.teachers or cfg.data is None:
        raise ValueError("a distillation run needs student, teachers and data (or none of "
                         "student/teachers for the embedded demo)")
    models = [("student", cfg.student), *(("teacher", t) for t in cfg.teachers)]
    for role, path in [*models, ("data", cfg.data), ("eval_data", cfg.eval_data),
                       ("tokenizer", cfg.tokenizer)]:
        if path is not None:
            existing(path, role)
    resume = _resume_target(cfg)
    for role, path in models:
        check_seq_len(load_config(path, role), cfg.seq_len, role)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.student, "student")
    check_teacher_tokenizers(tokenizer, cfg.teachers)
    train = tokenize(load_texts(cfg.data, cfg.text_field), tokenizer, cfg.text_field,
                     cfg.seq_len, cfg.packing, "training")
    held_out = None if cfg.eval_data is None else tokenize(
        load_texts(cfg.eval_data, cfg.text_field), tokenizer, cfg.text_field, cfg.seq_len,
        cfg.packing, "evaluation")
    dtype = torch.bfloat16 if cfg.bf16 else None
    student = load_model(cfg.student, "student")
    teachers = [load_model(path, "teacher", dtype) for path in cfg.teachers]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = CausalCollator(0 if pad is None else pad)
    out = Path(cfg.output_dir)
    trainer = DistillationTrainer(
        model=student, args=training_arguments(cfg, out), train_dataset=train,
        data_collator=collator, teachers=teachers, kd=LogitKD.from_config(cfg),
        features=FeatureSettings.from_config(cfg), vocab_size=len(tokenizer),
        callbacks=[JsonlLogger(out / "metrics.jsonl")],
    )

    def finish() -> dict[str, float]:
        trainer.save_model(str(out / "final"))
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(str(out / "final"))
        if held_out is None:
            return {}
        result = {"student_perplexity": perplexity(student, held_out, collator)}
        logger.info("held-out perplexity of the student: %.3f", result["student_perplexity"])
        return result

    return PreparedRun(trainer, resume, finish)


def _resume_target(cfg: DistillConfig) -> str | bool | None:
    """`resume_from_checkpoint` for `Trainer.train`: True for 'latest', else a checked path."""
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        if not any(Path(cfg.output_dir).glob("checkpoint-*")):
            raise FileNotFoundError(f"resume: no checkpoint-* folder in {cfg.output_dir!r}")
        return True
    if not Path(cfg.resume).is_dir():
        raise FileNotFoundError(f"resume checkpoint {cfg.resume!r} does not exist")
    return cfg.resume
