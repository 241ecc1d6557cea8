"""The on-disk format of captured teacher signals (`fastkd capture`), and its memory-mapped
read-back for training (`fastkd distill --teacher-signals`).

A capture is a folder holding `capture.json` (what was captured, from which teacher, tokenizer
and data) and safetensors shards. Token block r of the training data (row r of `tokenize`'s
output, in order) lives in shard r // rows_per_shard; a shard holds its rows' tokens back to
back:

- `offsets` (R + 1,) int64: row j's tokens are [offsets[j], offsets[j + 1]).
- `input_ids` (n,) int32: the tokens themselves (every batch read is checked against them).
- kind `topk`: `ids` (n, k) int32 and `logits` (n, k) (untempered, `dtype`) of the k
  largest teacher logits, and `lse` (n, len(temperatures)) float32, the teacher's logsumexp of
  z / T over its full vocabulary at each temperature served. z are the logits the teacher
  emits: its soft-cap and logit scale (Gemma 2/3, Granite, Cohere) applied, so a student trains
  on them without knowing the teacher's transform.
- kind `hidden`: `hidden` (n, H) in `dtype`, the teacher's final hidden states; the capture's
  `head.safetensors` holds one copy of the lm_head (`weight` (V, H), `bias` (V,) if any), and
  capture.json the teacher's logit transform (`teacher_softcap`, `teacher_logit_scale`).

Shards are written to a temporary name and renamed, so a shard file that exists is complete;
a resumed capture skips them. safetensors files are memory-mapped on read: a batch reads only
its own rows.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .heads import Head
from .vocab import PROBE, encode

FORMAT_VERSION = 1
KINDS = ("topk", "hidden")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
META_FILE = "capture.json"
HEAD_FILE = "head.safetensors"
_SHARD = "shard-{:05d}.safetensors"


def tokenizer_identity(tokenizer: Any) -> str:
    """sha256 over the tokenizer's vocabulary (token -> id), its special token ids and how it
    encodes a probe text (with and without special tokens): equal for tokenizers that map text
    to the same ids."""
    specials = {attr: getattr(tokenizer, attr, None)
                for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    content = {"vocab": sorted(tokenizer.get_vocab().items()), "specials": specials,
               "probe": [encode(tokenizer, PROBE, special) for special in (False, True)]}
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def data_fingerprint(blocks: Any) -> str:
    """blake2b over the token blocks (a `datasets.Dataset` with `input_ids`, or a list of
    rows), in order: each block's length and its tokens as int64."""
    digest = hashlib.blake2b(digest_size=16)
    for start in range(0, len(blocks), 1000):
        chunk = blocks[start:start + 1000]
        rows = chunk["input_ids"] if isinstance(chunk, dict) else [r["input_ids"] for r in chunk]
        for row in rows:
            tokens = torch.as_tensor(row, dtype=torch.int64)
            digest.update(len(tokens).to_bytes(8, "little"))
            digest.update(tokens.numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class CaptureMeta:
    """What a capture holds (`capture.json`).

    Attributes:
        kind: "topk" or "hidden".
        k: top-k width (kind topk; 0 for hidden).
        dtype: storage dtype of `logits` (topk) or `hidden` (hidden).
        temperatures: temperatures whose full-vocabulary logsumexp is stored (topk); a hidden
            capture serves every temperature (empty list).
        teacher: the teacher's path; teacher_revision: its commit hash when known, else a
            sha256 of its config.json.
        tokenizer: `tokenizer_identity`; vocab_size: lm_head rows used (the student's).
        hidden_size: the teacher's hidden size.
        seq_len, packing, text_field: the data pipeline's settings.
        data_fingerprint: `data_fingerprint` of the token blocks; rows, tokens: their counts.
        rows_per_shard: token blocks per shard file.
        teacher_softcap, teacher_logit_scale: the teacher's logit transform (None and 1.0:
            none), applied to the stored top-k logits and lse; with the head of a hidden
            capture.
    """

    kind: str
    k: int
    dtype: str
    temperatures: list[float]
    teacher: str
    teacher_revision: str
    tokenizer: str
    vocab_size: int
    hidden_size: int
    seq_len: int
    packing: bool
    text_field: str
    data_fingerprint: str
    rows: int
    tokens: int
    rows_per_shard: int
    teacher_softcap: float | None = None
    teacher_logit_scale: float = 1.0
    format: int = FORMAT_VERSION

    @property
    def shards(self) -> int:
        return math.ceil(self.rows / self.rows_per_shard)

    def write(self, folder: Path) -> None:
        _atomic_write(folder / META_FILE,
                      lambda tmp: tmp.write_text(json.dumps(asdict(self), indent=1) + "\n"))

    @classmethod
    def read(cls, folder: str | Path) -> CaptureMeta:
        path = Path(folder) / META_FILE
        if not path.is_file():
            raise FileNotFoundError(f"teacher_signals {str(folder)!r}: no {META_FILE} (not a "
                                    "folder written by fastkd capture)")
        try:
            values = json.loads(path.read_text())
            names = {f.name for f in fields(cls)}
            meta = cls(**{k: v for k, v in values.items() if k in names})
        except (ValueError, TypeError) as err:
            raise ValueError(f"teacher_signals {str(folder)!r}: unreadable {META_FILE}: "
                             f"{err}") from None
        if meta.format != FORMAT_VERSION or meta.kind not in KINDS:
            raise ValueError(f"teacher_signals {str(folder)!r}: format {meta.format}, kind "
                             f"{meta.kind!r}; this fastkd reads format {FORMAT_VERSION}, kinds "
                             f"{KINDS}")
        return meta

    def differences(self, other: CaptureMeta) -> list[str]:
        """Names of the fields whose values differ."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def shard_path(folder: Path, index: int) -> Path:
    return folder / _SHARD.format(index)


def missing_shards(folder: Path, meta: CaptureMeta) -> list[int]:
    return [i for i in range(meta.shards) if not shard_path(folder, i).is_file()]


def _atomic_write(path: Path, write: Any) -> None:
    """`write(tmp)` to a temporary file beside `path`, then rename it to `path` (atomic on
    POSIX): readers and a resumed capture see the whole file or none."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_shard(folder: Path, index: int, tensors: dict[str, torch.Tensor]) -> Path:
    """Write shard `index` atomically; returns its path."""
    path = shard_path(folder, index)
    contiguous = {name: t.contiguous() for name, t in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(contiguous, str(tmp)))
    return path


def write_head(folder: Path, head: Head) -> None:
    tensors = {"weight": head.weight.detach().cpu().contiguous()}
    if head.bias is not None:
        tensors["bias"] = head.bias.detach().cpu().contiguous()
    _atomic_write(folder / HEAD_FILE, lambda tmp: save_file(tensors, str(tmp)))


class CapturedSignals:
    """A finished capture, read back memory-mapped by token block (row) index.

    Args:
        folder: a folder written by `fastkd capture` (all shards present).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.meta = CaptureMeta.read(self.folder)
        missing = missing_shards(self.folder, self.meta)
        if missing or (self.meta.kind == "hidden" and not (self.folder / HEAD_FILE).is_file()):
            what = f"{len(missing)} of {self.meta.shards} shards missing" if missing else \
                HEAD_FILE + " missing"
            raise ValueError(f"teacher_signals {str(folder)!r} is an unfinished capture "
                             f"({what}); rerun the same fastkd capture to finish it")
        self._open: dict[int, Any] = {}
        self._offsets: dict[int, torch.Tensor] = {}

    def head(self) -> Head:
        """The stored lm_head (kind hidden), with the teacher's logit transform."""
        with safe_open(str(self.folder / HEAD_FILE), framework="pt") as f:
            names = set(f.keys())
            weight = f.get_tensor("weight")
            bias = f.get_tensor("bias") if "bias" in names else None
        return Head(weight, bias, self.meta.teacher_softcap, self.meta.teacher_logit_scale)

    def _shard(self, index: int) -> Any:
        if index not in self._open:
            if len(self._open) >= 64:  # bound the open files
                self._open.pop(next(iter(self._open)))
            self._open[index] = safe_open(str(shard_path(self.folder, index)), framework="pt")
            self._offsets.setdefault(index, self._open[index].get_tensor("offsets"))
        return self._open[index]

    def row(self, row: int) -> dict[str, torch.Tensor]:
        """Token block `row`'s tensors: input_ids (L,), and ids, logits (L, k), lse (L, nT)
        (topk) or hidden (L, H) (hidden)."""
        if not 0 <= row < self.meta.rows:
            raise ValueError(f"teacher_signals {str(self.folder)!r}: row {row} out of range "
                             f"(the capture holds {self.meta.rows} token blocks)")
        index, local = divmod(row, self.meta.rows_per_shard)
        shard = self._shard(index)
        start, end = (int(x) for x in self._offsets[index][local:local + 2])
        names = ("ids", "logits", "lse") if self.meta.kind == "topk" else ("hidden",)
        return {name: shard.get_slice(name)[start:end] for name in ("input_ids", *names)}

    def temperature_column(self, temperature: float) -> int:
        """Column of `lse` for `temperature` (topk), or `ValueError` if not served."""
        for i, served in enumerate(self.meta.temperatures):
            if math.isclose(served, temperature, rel_tol=1e-9):
                return i
        raise ValueError(f"teacher_signals {str(self.folder)!r} serves temperatures "
                         f"{self.meta.temperatures}, not {temperature}; capture again with "
                         f"--temperatures {temperature} (a hidden capture serves any)")


def check_capture(
    signals: CapturedSignals, *, tokenizer: str, fingerprint: str, seq_len: int,
    packing: bool, vocab_rows: int,
) -> None:
    """Raise `ValueError` naming what differs between a capture and this training run."""
    meta, name = signals.meta, repr(str(signals.folder))
    wanted = {"seq_len": seq_len, "packing": packing, "tokenizer": tokenizer,
              "vocab_size": vocab_rows, "data_fingerprint": fingerprint}
    for key, value in wanted.items():
        if getattr(meta, key) != value:
            what = {"tokenizer": "tokenizer identity (vocabulary, special tokens, encoding)",
                    "data_fingerprint": "data fingerprint (the token blocks of data)",
                    "vocab_size": "vocabulary rows (the student's lm_head)"}.get(key, key)
            raise ValueError(f"teacher_signals {name} does not match this run: its {what} is "
                             f"{getattr(meta, key)!r}, this run's {value!r}; capture again "
                             "with this run's settings")


def open_captures(paths: Sequence[str]) -> list[CapturedSignals]:
    """The captures named by `paths`; a path may also be a folder of captures (the
    `teacher<k>` subfolders a several-teacher `fastkd capture` writes), taken in order."""
    folders: list[Path] = []
    for path in paths:
        root = Path(path)
        if not root.exists():
            raise FileNotFoundError(f"teacher_signals path {path!r} does not exist")
        subs = sorted((p for p in root.glob("teacher*") if p.name[7:].isdigit()
                       and (p / META_FILE).is_file()), key=lambda p: int(p.name[7:]))
        folders.extend(subs if not (root / META_FILE).is_file() and subs else [root])
    return [CapturedSignals(f) for f in folders]
