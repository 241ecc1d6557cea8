"""Documents -> training blocks, packed with document boundaries or one per row.

Packed, documents are concatenated and cut into blocks of `seq_len` tokens; each block carries
`position_ids` that restart at 0 at every document start (and at the block start), and the
first token of every document gets IGNORE_INDEX as its label, so no token is predicted from
another document. transformers' causal masks (`masking_utils`, every decoder of transformers 5,
for eager and sdpa) read restarting `position_ids` given with ``attention_mask=None`` as packed
sequences and keep attention inside each document; the trainer passes packed batches so (see
`capture._forward_kwargs`). Flash attention reads `position_ids` so only for a single row; for
it the batch also carries the varlen kwargs of all its rows (`flash_varlen_kwargs`, as
transformers' `DataCollatorWithFlattening` makes them). A packed row is then computed as its
documents would be one by one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

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


def flash_varlen_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """FlashAttention's varlen forward kwargs (cu_seq_lens_q/k, max_length_q/k) of (B, T)
    packed `position_ids`, whose rows all start at position 0: each document (and each row's
    padding) is one sequence of the flattened B x T tokens."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(position_ids)
    return {"cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k, "max_length_q": int(max_q),
            "max_length_k": int(max_k)}
