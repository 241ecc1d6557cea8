"""Matching the vocabularies of teacher(s) and student.

A teacher's lm_head may carry padding rows beyond the student's (Qwen2.5 7B: 152,064 rows for
151,936 used by the 0.5B); those rows are dropped. Anything else that differs is refused: the
soft targets are only meaningful when token i means the same string in every model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)


# Encoded by student and teacher tokenizers alike (besides a few texts of the data): equal
# vocabularies can still split text differently (another pre-tokenizer or tokenizer class).
PROBE = "Distillation probe: The quick brown fox jumps over 13 lazy dogs, again & again!"


def encode(tokenizer: Any, text: str, add_special_tokens: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def check_encodes_text(tokenizer: Any, texts: Sequence[str], name: str) -> None:
    """Raise `ValueError` when the tokenizer turns every one of these non-empty texts (a sample
    of the data) into no tokens at all: the tokenizer does not fit the model directory or the
    data (transformers picks the tokenizer class from the model type: a word-level tokenizer
    saved beside a Qwen2 model loads as a byte-level `Qwen2Tokenizer`)."""
    texts = [t for t in texts if t and t.strip()]
    if texts and not any(encode(tokenizer, t) for t in texts):
        raise ValueError(
            f"{name} tokenizer ({type(tokenizer).__name__}) encodes non-empty text to no tokens "
            f"(e.g. {texts[0][:60]!r} -> []): its class does not fit its files or the data; "
            "transformers picks the tokenizer class from the model type, so save a tokenizer "
            "made for this model type, or give --tokenizer"
        )


def check_same_tokenizer(
    student: Any, teacher: Any, teacher_name: str, probes: Sequence[str] = ()
) -> None:
    """Raise `ValueError` unless both tokenizers map the same strings to the same ids, agree
    on the special tokens, and encode `PROBE` and `probes` (texts of the data) alike."""
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if s_vocab != t_vocab:
        diff = sorted(set(s_vocab.items()) ^ set(t_vocab.items()))[:5]
        raise ValueError(
            f"teacher {teacher_name!r}: its tokenizer differs from the student's "
            f"({len(t_vocab)} vs {len(s_vocab)} entries; first differing (token, id) pairs: "
            f"{diff}); distillation needs identical tokenizers"
        )
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        s_id, t_id = getattr(student, attr, None), getattr(teacher, attr, None)
        if s_id != t_id:
            raise ValueError(
                f"teacher {teacher_name!r}: tokenizer {attr} is {t_id}, the student's is {s_id}"
            )
    for text in (PROBE, *probes):
        for special in (False, True):
            s_ids, t_ids = encode(student, text, special), encode(teacher, text, special)
            if s_ids != t_ids:
                raise ValueError(
                    f"teacher {teacher_name!r}: its tokenizer ({type(teacher).__name__}) "
                    f"encodes {text[:60]!r} as {t_ids[:8]}, the student's "
                    f"({type(student).__name__}) as {s_ids[:8]}; distillation needs identical "
                    "tokenizers"
                )


def teacher_rows(
    student_rows: int, teacher_rows: int, used_tokens: int | None, teacher_name: str
) -> int:
    """How many of the teacher's lm_head rows to use: the student's row count.

    Args:
        student_rows: rows of the student's lm_head.
        teacher_rows: rows of the teacher's lm_head.
        used_tokens: size of the shared tokenizer (ids in use), or None when unknown.
        teacher_name: for messages.
    """
    if teacher_rows < student_rows:
        raise ValueError(
            f"teacher {teacher_name!r} has {teacher_rows} vocabulary rows, fewer than the "
            f"student's {student_rows}; their vocabularies cannot be matched"
        )
    if used_tokens is not None and used_tokens > student_rows:
        raise ValueError(
            f"the tokenizer has {used_tokens} tokens but the student's lm_head only "
            f"{student_rows} rows"
        )
    if teacher_rows > student_rows:
        logger.warning(
            "teacher %r: lm_head has %d rows, the student's %d; using the first %d "
            "(the extra rows are padding beyond the tokenizer)",
            teacher_name, teacher_rows, student_rows, student_rows,
        )
    return student_rows
