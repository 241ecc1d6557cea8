"""Documents -> training blocks, packed with document boundaries or one per row.

Packed, documents are concatenated and cut into blocks of `seq_len` tokens; each block carries
`position_ids` that restart at 0 at every document start (and at the block start), and the
first token of every document gets IGNORE_INDEX as its label, so no token is predicted from
another document. transformers' causal masks (`masking_utils`, every decoder of transformers 5,
for eager, sdpa and flash attention alike) read restarting `position_ids` given with
``attention_mask=None`` as packed sequences and keep attention inside each document; the
trainer passes packed batches so (see `capture._forward_kwargs`). A packed row is then computed
as its documents would be one by one.
"""

from __future__ import annotations

from collections.abc import Iterable

from .loss import IGNORE_INDEX

Document = tuple[list[int], list[bool]]  # token ids, counted flag per token


def labels_of(ids: list[int], counted: list[bool]) -> list[int]:
    """Each token id where counted, else IGNORE_INDEX (the unshifted labels of a document)."""
    return [t if c else IGNORE_INDEX for t, c in zip(ids, counted, strict=True)]


def pack(documents: Iterable[Document], seq_len: int) -> dict[str, list[list[int]]]:
    """Blocks of `seq_len` tokens (the last may be shorter): input_ids, labels, position_ids."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for doc_ids, counted in documents:
        if not doc_ids:
            continue
        doc_labels = labels_of(doc_ids, counted)
        doc_labels[0] = IGNORE_INDEX  # nothing of this document precedes its first token
        for k, (token, label) in enumerate(zip(doc_ids, doc_labels, strict=True)):
            # a document cut by a block boundary restarts its positions in the next block
            start = k == 0 or len(positions) % seq_len == 0
            positions.append(0 if start else positions[-1] + 1)
            ids.append(token)
            labels.append(label)
    cuts = range(0, len(ids), seq_len)
    return {"input_ids": [ids[i:i + seq_len] for i in cuts],
            "labels": [labels[i:i + seq_len] for i in cuts],
            "position_ids": [positions[i:i + seq_len] for i in cuts]}


def truncate(documents: Iterable[Document], seq_len: int) -> dict[str, list[list[int]]]:
    """One row per non-empty document, cut to `seq_len` tokens: input_ids, labels."""
    rows = [(ids[:seq_len], counted[:seq_len]) for ids, counted in documents if ids]
    return {"input_ids": [ids for ids, _ in rows],
            "labels": [labels_of(ids, counted) for ids, counted in rows]}
