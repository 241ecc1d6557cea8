"""Training data: local text / JSON lines / parquet files or a saved `datasets` dataset ->
token blocks (`packing`) -> padded batches. Formats and loss masks: `chat`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from .chat import encode
from .loss import IGNORE_INDEX
from .packing import pack, truncate

# file suffix -> `datasets` builder
_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json",
             ".parquet": "parquet"}


def load_texts(path: str, text_field: str | None = None) -> Dataset:
    """Load a `datasets` dataset saved to disk (`save_to_disk`; of a `DatasetDict`, its
    'train' split or its only one) or a local file or folder of .txt / .json / .jsonl /
    .parquet files (one kind). `text_field`, when given, must be a column."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data path {path!r} does not exist")
    if root.is_dir() and any((root / f).is_file() for f in _SAVED_MARKERS):
        ds = _load_saved(path)
    else:
        ds = _load_files(root, path)
    if text_field is not None and text_field not in ds.column_names:
        raise ValueError(
            f"data path {path!r} has no column {text_field!r} (columns: {ds.column_names}); "
            "set text_field"
        )
    return ds


# files that `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _load_saved(path: str) -> Dataset:
    try:
        ds = load_from_disk(path)
    except Exception as err:  # datasets raises many kinds; name the path in any case
        raise ValueError(f"data path {path!r} could not be read by datasets.load_from_disk: "
                         f"{str(err).strip() or type(err).__name__}") from err
    if isinstance(ds, DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise ValueError(f"data path {path!r} holds splits {sorted(ds)}: no 'train' split "
                             "and more than one; save the split to use")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return ds


def _load_files(root: Path, path: str) -> Dataset:
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
        return load_dataset(builder, data_files=[str(p) for p in chosen], split="train")
    except Exception as err:  # datasets raises many kinds; name the path in any case
        reason = str(err).strip() or type(err).__name__
        raise ValueError(f"data path {path!r} could not be read as {builder}: {reason}") from err


def _is_empty(path: Path) -> bool:
    """No bytes, or (text and JSON lines) only white space."""
    size = path.stat().st_size
    if size == 0:
        return True
    if path.suffix == ".parquet" or size > 1 << 16:
        return False
    return not path.read_bytes().strip()


def tokenize(
    ds: Dataset, tokenizer: Any, text_field: str, seq_len: int, packing: bool, name: str,
    data_format: str = "text", assistant_only: bool = True,
) -> Dataset:
    """Token blocks in `input_ids` and `labels` columns (plus `position_ids` when packing).

    Each example is encoded by `chat.encode` (format `data_format`: text, messages or
    prompt_completion), its uncounted tokens labelled IGNORE_INDEX. packing: documents (plain
    texts followed by EOS when the tokenizer has one) are packed into blocks of `seq_len` with
    document boundaries (`packing.pack`, per map batch of 1000 documents, whose last block
    may be shorter); otherwise each document is truncated to `seq_len`. Raises `ValueError`
    when no block holds a token to predict.
    """

    def encode_batch(batch: dict[str, list]) -> dict[str, list]:
        docs = encode(tokenizer, batch, data_format, text_field, assistant_only, packing)
        return pack(docs, seq_len) if packing else truncate(docs, seq_len)

    out = ds.map(encode_batch, batched=True, batch_size=1000, remove_columns=ds.column_names)
    if len(out) == 0 or not any(label != IGNORE_INDEX for row in out["labels"]
                                for label in row[1:]):
        texts = (sum(1 for text in ds[text_field] if text and text.strip())
                 if data_format == "text" else 0)
        tokens = sum(len(x) for x in out["input_ids"]) if len(out) else 0
        hint = (f"; its {texts} non-empty texts gave {tokens} tokens: does the tokenizer "
                f"({type(tokenizer).__name__}) fit this data?" if texts and tokens < texts else "")
        raise ValueError(f"{name} dataset is empty after tokenization (no sequence with a "
                         f"counted token after its first, so nothing to predict){hint}")
    return out


@dataclass
class CausalCollator:
    """Pads rows of `input_ids` (with `labels`, and `position_ids` when packed) on the right.

    Returns input_ids (B, T), attention_mask (B, T), labels (B, T): the rows' labels, or
    input_ids, with IGNORE_INDEX at padding (unshifted; the loss shifts them), and position_ids
    (B, T) when the rows have them (the padding then forms one more segment, its positions
    restarting at 0, so packed-sequence detection keeps it apart); and row_index (B,) when the
    rows carry one (the token block index that training from a capture reads signals by).
    """

    pad_token_id: int

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        packed = "position_ids" in features[0]
        positions = torch.arange(width).repeat(len(rows), 1) if packed else None
        for i, (r, f) in enumerate(zip(rows, features, strict=True)):
            n = len(r)
            ids[i, :n] = r
            mask[i, :n] = 1
            labels[i, :n] = torch.as_tensor(f.get("labels", r), dtype=torch.long)
            if positions is not None:
                positions[i, :n] = torch.as_tensor(f["position_ids"], dtype=torch.long)
                positions[i, n:] -= n
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if positions is not None:
            batch["position_ids"] = positions
        if all("row_index" in f for f in features):
            batch["row_index"] = torch.tensor([int(f["row_index"]) for f in features])
        return batch
