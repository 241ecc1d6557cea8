"""A distillation run on local checkpoints and data: every check first, then training."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from .chat import check_chat_template, detect_format
from .config import DistillConfig
from .data import CausalCollator, load_texts, tokenize
from .evaluate import HeldOutEvaluation, perplexity
from .features import FeatureSettings
from .loss import LogitKD
from .metrics import JsonlLogger
from .model_entries import ModelEntry
from .models import (
    ModelSource,
    check_seq_len,
    check_teacher_tokenizers,
    existing,
    load_config,
    load_model,
    load_tokenizer,
    resolvable,
)
from .on_policy import rollouts_from_config
from .signals import (
    CapturedSignals,
    check_capture,
    data_fingerprint,
    open_captures,
    tokenizer_identity,
)
from .teacher_shard import shard_teacher
from .teachers import check_captures
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
    if cfg.student is None or not (cfg.teachers or cfg.teacher_signals) or cfg.data is None:
        raise ValueError("a distillation run needs student, teachers and data (teacher_signals "
                         "in place of teachers; none of student/teachers for the embedded "
                         "demo)")
    cfg.check_runtime()
    student_source, teacher_sources = model_sources(cfg)
    models = [("student", student_source), *(("teacher", t) for t in teacher_sources)]
    for role, name in [*((role, source.name) for role, source in models),
                       ("tokenizer", cfg.tokenizer)]:
        if name is not None:
            resolvable(name, role)
    for role, path in [("data", cfg.data), ("eval_data", cfg.eval_data)]:
        if path is not None:
            existing(path, role)
    captures = open_captures(cfg.teacher_signals)
    if captures:
        cfg.check_teacher_count(len(captures))
    resume = _resume_target(cfg)
    done = _finished(cfg, resume)
    if done is not None:
        return FinishedRun(done)
    out = Path(cfg.output_dir)
    args = training_arguments(cfg, out)  # refuses bad training_args before any model loads
    for role, source in models:
        check_seq_len(load_config(source, role), cfg.seq_len, role)
    tokenizer, train, held_out = token_blocks(cfg, cfg.tokenizer or student_source, "student")
    kd = LogitKD.from_config(cfg)
    if captures:
        train = _check_captures(cfg, captures, kd, tokenizer, train)
    lora = None
    if cfg.lora is not None:
        from .lora import LoraSettings

        lora = LoraSettings.from_dict(cfg.lora)
    quantization = lora.quantization_config(_compute_dtype(cfg)) if lora else None
    student = load_model(student_source, "student",
                         quantization=None if quantization is None else (quantization, args.device))
    if lora is not None:
        student = lora.apply(student, cfg.seed)
        trainable, total = student.get_nb_trainable_parameters()
        logger.info("LoRA student: %d of %d parameters train", trainable, total)
    teachers = [load_model(source, "teacher", _teacher_dtype(cfg, entry))
                for source, entry in zip(teacher_sources, cfg.teacher_entries, strict=True)]
    if cfg.teacher_sharding == "fsdp":
        teachers = [shard_teacher(t, args.device) for t in teachers]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = CausalCollator(0 if pad is None else pad)
    trainer = DistillationTrainer(
        model=student, args=args, train_dataset=train,
        data_collator=collator, teachers=teachers, teacher_signals=captures, kd=kd,
        features=FeatureSettings.from_config(cfg), vocab_size=len(tokenizer),
        on_policy=rollouts_from_config(cfg.on_policy, kd, cfg.seed, collator.pad_token_id,
                                       tokenizer.eos_token_id),
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
                base = partial(load_model, student_source, "student")
                lora.merged(student, base, out / "final").save_pretrained(str(out / "merged"))
                tokenizer.save_pretrained(str(out / "merged"))
        if held_out is None:
            return {}
        result = {"student_perplexity": perplexity(student, held_out, collator)}
        logger.info("held-out perplexity of the student: %.3f", result["student_perplexity"])
        return result

    return PreparedRun(trainer, resume, finish)


def _check_captures(cfg: DistillConfig, captures: list[CapturedSignals], kd: LogitKD,
                    tokenizer: Any, train: Dataset) -> Dataset:
    """Refuse captures of another tokenizer, data, seq_len, vocabulary or temperature (no
    model loaded yet); returns the training blocks with their row_index column."""
    rows = load_config(model_sources(cfg)[0], "student").get_text_config().vocab_size
    identity, fingerprint = tokenizer_identity(tokenizer), data_fingerprint(train)
    for capture in captures:
        check_capture(capture, tokenizer=identity, fingerprint=fingerprint,
                      seq_len=cfg.seq_len, packing=cfg.packing, vocab_rows=rows)
    check_captures(captures, kd, rows)
    return train.add_column("row_index", list(range(len(train))))


def token_blocks(
    cfg: DistillConfig, tokenizer_source: ModelSource | str, role: str
) -> tuple[Any, Dataset, Dataset | None]:
    """The run's tokenizer and its training and held-out token blocks (`tokenize`: plain text,
    chat messages or prompt/completion, with their loss masks), after the tokenizer checks
    (it encodes the data; every teacher's tokenizer is the same). `fastkd capture` calls this
    too, so that a capture and a training run see the same blocks."""
    tokenizer = load_tokenizer(tokenizer_source, role)
    texts = load_texts(cfg.data)
    data_format = detect_format(texts, cfg.data_format, cfg.text_field, "training")
    check_chat_template(tokenizer, data_format)
    probes = _probes(texts, data_format, cfg.text_field)
    check_encodes_text(tokenizer, probes, f"the {role}'s")
    check_teacher_tokenizers(tokenizer, teacher_sources(cfg), probes)
    encoding = dict(data_format=data_format, assistant_only=cfg.assistant_only_loss)
    train = tokenize(texts, tokenizer, cfg.text_field, cfg.seq_len, cfg.packing, "training",
                     **encoding)
    held_out = None
    if cfg.eval_data is not None:
        eval_texts = load_texts(cfg.eval_data)
        detect_format(eval_texts, data_format, cfg.text_field, "evaluation")
        held_out = tokenize(eval_texts, tokenizer, cfg.text_field, cfg.seq_len, cfg.packing,
                            "evaluation", **encoding)
    return tokenizer, train, held_out


def model_sources(cfg: DistillConfig) -> tuple[ModelSource, list[ModelSource]]:
    """The student's and the teachers' names with their `from_pretrained` options."""
    student = cfg.student_entry
    assert student is not None
    return _source(cfg, student, cfg.revision), teacher_sources(cfg)


def teacher_sources(cfg: DistillConfig) -> list[ModelSource]:
    """The teachers' names with their `from_pretrained` options."""
    revisions = cfg.teacher_revisions or [None] * len(cfg.teachers)
    return [_source(cfg, entry, revision)
            for entry, revision in zip(cfg.teacher_entries, revisions, strict=True)]


def _source(cfg: DistillConfig, entry: ModelEntry, revision: str | None) -> ModelSource:
    """An entry's options, each falling back to the run's global one where it sets none."""
    return ModelSource(entry.path, entry.revision or revision, entry.dtype or cfg.dtype,
                       entry.attn_implementation or cfg.attn_implementation)


def _probes(texts: Dataset, data_format: str, text_field: str) -> list[str]:
    """Up to 16 texts of the data (message contents, prompts and completions) on which the
    tokenizers are compared."""
    rows = texts.select(range(min(len(texts), 16)))
    if data_format == "messages":
        found = [str(m.get("content", "")) for turns in rows["messages"] for m in turns]
    elif data_format == "prompt_completion":
        found = [str(t) for t in [*rows["prompt"], *rows["completion"]]]
    else:
        found = [str(t) for t in rows[text_field]]
    return found[:16]


def _compute_dtype(cfg: DistillConfig) -> torch.dtype:
    """The matmul dtype of a QLoRA student's 4-bit layers: bf16 under --bf16, else fp32."""
    return torch.bfloat16 if cfg.bf16 else torch.float32


def _teacher_dtype(cfg: DistillConfig, entry: ModelEntry | None = None) -> torch.dtype | None:
    """The dtype a teacher loads in over its source's: None when its entry sets its own dtype
    (the source has it); else teacher_dtype, else bf16 under --bf16, else None (the source's:
    the global dtype, or the checkpoint's)."""
    if entry is not None and entry.dtype is not None:
        return None
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
