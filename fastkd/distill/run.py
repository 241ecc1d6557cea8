"""A distillation run on local checkpoints and data: every check first, then training."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DistillConfig
from .data import CausalCollator, load_texts, tokenize
from .evaluate import HeldOutEvaluation, perplexity
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
from .teacher_shard import shard_teacher
from .trainer import DistillationTrainer
from .training import training_arguments
from .vocab import check_encodes_text

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


@dataclass
class FinishedRun:
    """A resumed run whose checkpoint already holds every step asked for: nothing to do."""

    message: str

    def __call__(self) -> dict[str, float]:
        print(f"fastkd distill: {self.message}")
        return {}


def prepare(cfg: DistillConfig) -> PreparedRun | FinishedRun:
    """Load and check models, tokenizers and data; raise before any training step on bad
    input (missing paths, mismatched vocabularies, empty data, seq_len too long). Resuming a
    run whose checkpoint already reached `cfg.steps` loads nothing and trains nothing."""
    if cfg.student is None or not cfg.teachers or cfg.data is None:
        raise ValueError("a distillation run needs student, teachers and data (or none of "
                         "student/teachers for the embedded demo)")
    cfg.check_runtime()
    models = [("student", cfg.student), *(("teacher", t) for t in cfg.teachers)]
    for role, path in [*models, ("data", cfg.data), ("eval_data", cfg.eval_data),
                       ("tokenizer", cfg.tokenizer)]:
        if path is not None:
            existing(path, role)
    resume = _resume_target(cfg)
    done = _finished(cfg, resume)
    if done is not None:
        return FinishedRun(done)
    out = Path(cfg.output_dir)
    args = training_arguments(cfg, out)  # refuses bad training_args before any model loads
    for role, path in models:
        check_seq_len(load_config(path, role), cfg.seq_len, role)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.student, "student")
    texts = load_texts(cfg.data, cfg.text_field)
    probes = [str(t) for t in texts.select(range(min(len(texts), 16)))[cfg.text_field]]
    check_encodes_text(tokenizer, probes, "the student's")
    check_teacher_tokenizers(tokenizer, cfg.teachers, probes)
    train = tokenize(texts, tokenizer, cfg.text_field, cfg.seq_len, cfg.packing, "training")
    held_out = None if cfg.eval_data is None else tokenize(
        load_texts(cfg.eval_data, cfg.text_field), tokenizer, cfg.text_field, cfg.seq_len,
        cfg.packing, "evaluation")
    student = load_model(cfg.student, "student")
    if cfg.lora is not None:
        from .lora import LoraSettings

        student = LoraSettings.from_dict(cfg.lora).apply(student, cfg.seed)
        trainable, total = student.get_nb_trainable_parameters()
        logger.info("LoRA student: %d of %d parameters train", trainable, total)
    teachers = [load_model(path, "teacher", _teacher_dtype(cfg)) for path in cfg.teachers]
    if cfg.teacher_sharding == "fsdp":
        teachers = [shard_teacher(t, args.device) for t in teachers]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = CausalCollator(0 if pad is None else pad)
    trainer = DistillationTrainer(
        model=student, args=args, train_dataset=train,
        data_collator=collator, teachers=teachers, kd=LogitKD.from_config(cfg),
        features=FeatureSettings.from_config(cfg), vocab_size=len(tokenizer),
        callbacks=[JsonlLogger(out / "metrics.jsonl")],
    )
    if cfg.eval_steps is not None:
        trainer.add_callback(HeldOutEvaluation(
            trainer, held_out, collator, cfg.eval_steps, cfg.batch_size,
            best_dir=out / "best" if cfg.save_best else None, best_metric=cfg.best_metric,
            save_extra=tokenizer.save_pretrained))

    def finish() -> dict[str, float]:
        trainer.save_model(str(out / "final"))
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(str(out / "final"))
            if cfg.merge_lora:
                student.merge_and_unload().save_pretrained(str(out / "merged"))
                tokenizer.save_pretrained(str(out / "merged"))
        if held_out is None:
            return {}
        result = {"student_perplexity": perplexity(student, held_out, collator)}
        logger.info("held-out perplexity of the student: %.3f", result["student_perplexity"])
        return result

    return PreparedRun(trainer, resume, finish)


def _teacher_dtype(cfg: DistillConfig) -> torch.dtype | None:
    """The teachers' weight dtype: teacher_dtype, else bf16 under --bf16, else the
    checkpoint's."""
    if cfg.teacher_dtype is not None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16,
                "fp32": torch.float32}[cfg.teacher_dtype]
    return torch.bfloat16 if cfg.bf16 else None


def _resume_target(cfg: DistillConfig) -> str | None:
    """`resume_from_checkpoint` for `Trainer.train`: the checkpoint folder to resume from
    (the latest `checkpoint-*` of output_dir for 'latest'), checked to exist."""
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(cfg.output_dir) if Path(cfg.output_dir).is_dir() else None
        if last is None:
            raise FileNotFoundError(f"resume: no checkpoint-* folder in {cfg.output_dir!r}")
        return last
    if not Path(cfg.resume).is_dir():
        raise FileNotFoundError(f"resume checkpoint {cfg.resume!r} does not exist")
    return cfg.resume


def _finished(cfg: DistillConfig, checkpoint: str | None) -> str | None:
    """A message when `checkpoint` already reached `cfg.steps` (else None): the Trainer would
    otherwise train one step more than asked."""
    if checkpoint is None:
        return None
    state = Path(checkpoint) / "trainer_state.json"
    try:
        step = int(json.loads(state.read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"resume checkpoint {checkpoint!r}: no readable trainer_state.json "
                         f"({err})") from None
    if step < cfg.steps:
        return None
    return (f"the run in {cfg.output_dir!r} is finished: {checkpoint!r} holds {step} steps, "
            f"and steps is {cfg.steps}; nothing to train (raise --steps to train on)")
