"""Loading teacher and student checkpoints and tokenizers from local directories, with the
checks that must pass before any training step."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from .vocab import check_same_tokenizer

logger = logging.getLogger(__name__)


def existing(path: str, role: str) -> str:
    """`path`, or `FileNotFoundError` naming the role (student, teacher, data...) if missing."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{role} path {path!r} does not exist")
    return path


def load_config(path: str, role: str) -> PretrainedConfig:
    """The model config of a local directory (no weights loaded)."""
    try:
        return AutoConfig.from_pretrained(existing(path, role))
    except (OSError, ValueError) as err:
        raise ValueError(f"{role} {path!r} has no readable model config: {err}") from err


def load_model(path: str, role: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A `*ForCausalLM` from a local directory; missing or unreadable -> a clear error."""
    try:
        return AutoModelForCausalLM.from_pretrained(existing(path, role), dtype=dtype)
    except (OSError, ValueError) as err:
        raise ValueError(f"{role} {path!r} could not be loaded as a causal LM: {err}") from err


def load_tokenizer(path: str, role: str) -> Any:
    try:
        return AutoTokenizer.from_pretrained(existing(path, role))
    except (OSError, ValueError) as err:
        raise ValueError(f"{role} tokenizer {path!r} could not be loaded: {err}") from err


def check_teacher_tokenizers(
    student_tokenizer: Any, teacher_paths: list[str], probes: Sequence[str] = ()
) -> None:
    """Refuse teachers whose tokenizer differs (also in how it encodes `probes`, texts of the
    data); a teacher directory without a tokenizer is accepted with a warning (its lm_head
    size is still checked)."""
    for path in teacher_paths:
        try:
            teacher_tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            logger.warning("teacher %r has no loadable tokenizer; assuming the student's", path)
            continue
        check_same_tokenizer(student_tokenizer, teacher_tokenizer, path, probes)


def check_seq_len(config: PretrainedConfig, seq_len: int, role: str) -> None:
    """Raise `ValueError` when `seq_len` exceeds the model's maximum positions."""
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ValueError(f"seq_len={seq_len} exceeds {role}'s max_position_embeddings={limit}")
