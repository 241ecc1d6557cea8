"""The student and teacher entries of a distillation config: a path or hub id, or a mapping
that also sets the model's own `from_pretrained` options (no torch import: the CLI checks
entries before it loads anything).

    student: google/gemma-2-2b                  # a name: the run's global options apply
    teachers:
      - path: google/gemma-2-9b                 # a mapping: its own options, each optional
        revision: main
        dtype: bfloat16                         # torch_dtype: another name for it
        attn_implementation: eager

An option an entry leaves out falls back to the global key (`revision` / `teacher_revisions`,
`dtype`, `attn_implementation`; a teacher's dtype also to `teacher_dtype` and `bf16`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from typing import Any

MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelEntry:
    """One model of a run. path: local directory or hub id; revision, dtype (a key of
    MODEL_DTYPES), attn_implementation: its own options, None where the entry sets none."""

    path: str
    revision: str | None = None
    dtype: str | None = None
    attn_implementation: str | None = None

    @classmethod
    def parse(cls, value: str | dict[str, Any], where: str) -> ModelEntry:
        """An entry from a config value (a name or a mapping); `where` names it in errors
        ('student', 'teachers[1]'): unknown keys, a missing path, values of the wrong type or
        an unknown dtype raise `ValueError` / `TypeError`."""
        if isinstance(value, str):
            return cls(value)
        values = dict(value)
        if "torch_dtype" in values:  # transformers < 5 called `dtype` so
            if "dtype" in values:
                raise ValueError(f"{where}: give dtype or torch_dtype (the same setting), not "
                                 "both")
            values["dtype"] = values.pop("torch_dtype")
        names = [f.name for f in fields(cls)]
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"{where}: unknown key {key!r}{hint}; a model entry takes "
                                 f"{', '.join(names)}")
        if "path" not in values:
            raise ValueError(f"{where}: a model mapping needs path (a directory or hub id)")
        for key, item in values.items():
            if not (isinstance(item, str) or (item is None and key != "path")):
                raise TypeError(f"{where}: {key} expects a string, got {item!r}")
        entry = cls(**values)
        if entry.dtype is not None and entry.dtype not in MODEL_DTYPES:
            raise ValueError(f"{where}: unknown dtype {entry.dtype!r}; expected one of "
                             f"{MODEL_DTYPES}")
        return entry
