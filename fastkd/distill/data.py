"""Training data: local text / JSON lines / parquet files -> token blocks -> padded batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, load_dataset

from .loss import IGNORE_INDEX

# file suffix -> `datasets` builder
_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json",
             ".parquet": "parquet"}


def load_texts(path: str, text_field: str) -> Dataset:
    """Load a local file or folder of .txt / .json / .jsonl / .parquet files (one kind)."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data path {path!r} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    builders = {_BUILDERS.get(p.suffix) for p in files if p.suffix in _BUILDERS}
    if len(builders) != 1:
        found = sorted({p.suffix for p in files})
        raise ValueError(
            f"data path {path!r}: expected files of one kind among {sorted(_BUILDERS)}, "
            f"found suffixes {found}"
        )
    (builder,) = builders
    chosen = [p for p in files if _BUILDERS.get(p.suffix) == builder]
    if all(_is_empty(p) for p in chosen):
        which = "the file is" if chosen == [root] else f"all its {len(chosen)} {builder} files are"
        raise ValueError(f"data path {path!r}: {which} empty")
    try:
        ds = load_dataset(builder, data_files=[str(p) for p in chosen], split="train")
    except Exception as err:  # datasets raises many kinds; name the path in any case
        reason = str(err).strip() or type(err).__name__
        raise ValueError(f"data path {path!r} could not be read as {builder}: {reason}") from err
    if text_field not in ds.column_names:
        raise ValueError(
            f"data path {path!r} has no column {text_field!r} (columns: {ds.column_names}); "
            "set text_field"
        )
    return ds


def _is_empty(path: Path) -> bool:
    """No bytes, or (text and JSON lines) only white space."""
    size = path.stat().st_size
    if size == 0:
        return True
    if path.suffix == ".parquet" or size > 1 << 16:
        return False
    return not path.read_bytes().strip()


def tokenize(
    ds: Dataset, tokenizer: Any, text_field: str, seq_len: int, packing: bool, name: str
) -> Dataset:
    """Token blocks in an `input_ids` column.

    packing: documents (each followed by EOS when the tokenizer has one) are concatenated and cut
    into blocks of `seq_len` (per map batch of 1000 documents, whose last block may be shorter);
    otherwise each document is truncated to `seq_len`. Raises `ValueError` when no block holds
    a token to predict (at least two tokens).
    """
    eos = [tokenizer.eos_token_id] if packing and tokenizer.eos_token_id is not None else []

    def encode(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch[text_field], add_special_tokens=not packing)["input_ids"]
        if not packing:
            return {"input_ids": [x[:seq_len] for x in ids if x]}
        flat = list(chain.from_iterable(x + eos for x in ids if x))
        return {"input_ids": [flat[i:i + seq_len] for i in range(0, len(flat), seq_len)]}

    out = ds.map(encode, batched=True, batch_size=1000, remove_columns=ds.column_names)
    if len(out) == 0 or not any(len(x) >= 2 for x in out["input_ids"]):
        texts = sum(1 for text in ds[text_field] if text and text.strip())
        tokens = sum(len(x) for x in out["input_ids"]) if len(out) else 0
        hint = (f"; its {texts} non-empty texts gave {tokens} tokens: does the tokenizer "
                f"({type(tokenizer).__name__}) fit this data?" if texts and tokens < texts else "")
        raise ValueError(f"{name} dataset is empty after tokenization (no sequence of two or "
                         f"more tokens, so nothing to predict){hint}")
    return out


@dataclass
class CausalCollator:
    """Pads `input_ids` lists on the right into a batch.

    Returns input_ids (B, T), attention_mask (B, T) and labels (B, T) = input_ids with
    IGNORE_INDEX at padding (unshifted; the loss shifts them); and row_index (B,) when the
    rows carry one (the token block index that training from a capture reads signals by).
    """

    pad_token_id: int

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if features and all("row_index" in f for f in features):
            batch["row_index"] = torch.tensor([int(f["row_index"]) for f in features])
        return batch
