"""Loading teacher and student checkpoints and tokenizers from local directories or hub model
ids, with the checks that must pass before any training step.

A name that is no local path but reads as a hub id (``org/name``) goes to `from_pretrained`,
which downloads it or, with ``HF_HUB_OFFLINE=1``, finds it in the local Hugging Face cache.
`revision`, `dtype` and `attn_implementation` pass through to `from_pretrained`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
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


# a hub model id: 'name' or 'org/name' (letters, digits, '-', '_', '.')
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def existing(path: str, role: str) -> str:
    """`path`, or `FileNotFoundError` naming the role (student, teacher, data...) if missing."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{role} path {path!r} does not exist")
    return path


def resolvable(name: str, role: str) -> str:
    """`name` when it is a local path or reads as a hub id, else `FileNotFoundError`."""
    if Path(name).exists() or (_HUB_ID.fullmatch(name) and not name.startswith(".")):
        return name
    raise FileNotFoundError(f"{role} path {name!r} does not exist (and is no hub model id)")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a local directory or hub id, and `from_pretrained` options.

    dtype: a key of DTYPES or None (transformers' default); attn_implementation: 'eager',
    'sdpa', 'flash_attention_2'... or None.
    """

    name: str
    revision: str | None = None
    dtype: str | None = None
    attn_implementation: str | None = None

    def hub_kwargs(self) -> dict[str, Any]:
        """Options of every `from_pretrained` call (config, tokenizer, model)."""
        return {} if self.revision is None else {"revision": self.revision}

    def model_kwargs(self) -> dict[str, Any]:
        kwargs = self.hub_kwargs()
        if self.dtype is not None:
            kwargs["dtype"] = DTYPES[self.dtype]
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        return kwargs


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def load_config(source: ModelSource | str, role: str) -> PretrainedConfig:
    """The model config of a local directory or hub id (no weights loaded)."""
    source = ModelSource(source) if isinstance(source, str) else source
    try:
        return AutoConfig.from_pretrained(resolvable(source.name, role), **source.hub_kwargs())
    except (OSError, ValueError) as err:
        raise ValueError(f"{role} {source.name!r} has no readable model config: "
                         f"{_one_line(err)}") from err


def load_model(
    source: ModelSource | str, role: str, dtype: torch.dtype | None = None,
    quantization: tuple[Any, torch.device] | None = None,
) -> PreTrainedModel:
    """A `*ForCausalLM` from a local directory or hub id; `dtype` overrides the source's;
    `quantization` (a transformers quantization config, the device to load onto) loads a
    quantized model there; missing or unreadable -> a clear error."""
    source = ModelSource(source) if isinstance(source, str) else source
    kwargs = source.model_kwargs()
    if dtype is not None:
        kwargs["dtype"] = dtype
    if quantization is not None:  # a quantized model is placed at load, not moved later
        kwargs["quantization_config"], device = quantization
        kwargs["device_map"] = {"": str(device)}
    try:
        return AutoModelForCausalLM.from_pretrained(resolvable(source.name, role), **kwargs)
    except (OSError, ValueError, ImportError) as err:
        raise ValueError(f"{role} {source.name!r} could not be loaded as a causal LM: "
                         f"{_one_line(err)}") from err


def load_tokenizer(source: ModelSource | str, role: str) -> Any:
    source = ModelSource(source) if isinstance(source, str) else source
    try:
        return AutoTokenizer.from_pretrained(resolvable(source.name, role),
                                             **source.hub_kwargs())
    except (OSError, ValueError) as err:
        raise ValueError(f"{role} tokenizer {source.name!r} could not be loaded: "
                         f"{_one_line(err)}") from err


def check_teacher_tokenizers(
    student_tokenizer: Any, teachers: Sequence[ModelSource | str], probes: Sequence[str] = ()
) -> None:
    """Refuse teachers whose tokenizer differs (also in how it encodes `probes`, texts of the
    data); a teacher directory without a tokenizer is accepted with a warning (its lm_head
    size is still checked)."""
    for teacher in teachers:
        teacher = ModelSource(teacher) if isinstance(teacher, str) else teacher
        path = teacher.name
        try:
            teacher_tokenizer = AutoTokenizer.from_pretrained(path, **teacher.hub_kwargs())
        except (OSError, ValueError):
            logger.warning("teacher %r has no loadable tokenizer; assuming the student's", path)
            continue
        check_same_tokenizer(student_tokenizer, teacher_tokenizer, path, probes)


def check_seq_len(config: PretrainedConfig, seq_len: int, role: str) -> None:
    """Raise `ValueError` when `seq_len` exceeds the model's maximum positions."""
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ValueError(f"seq_len={seq_len} exceeds {role}'s max_position_embeddings={limit}")
