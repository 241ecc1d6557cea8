"""A packed batch with restarting positions and a block-diagonal mask gives the documents'
own logits and per-token losses."""

import pytest
import torch
import torch.nn.functional as F

from fastkd.distill.packing import block_causal_mask, restart_positions

from .distill_helpers import llama


def test_restart_positions():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    assert restart_positions(doc).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_equals_documents_one_by_one(impl):
    model = llama().double().eval()
    model.config._attn_implementation = impl
    docs = [torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[10, 11, 12]]),
            torch.tensor([[40, 41, 42, 43]])]
    doc_ids = torch.cat([torch.full(d.shape, k) for k, d in enumerate(docs)], 1)
    packed = torch.cat(docs, 1)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=d).logits for d in docs], 1)
        together = model(input_ids=packed, position_ids=restart_positions(doc_ids),
                         attention_mask=block_causal_mask(doc_ids, torch.float64)).logits
    # float64 throughout, 2 layers of width 24: a few ulps of the logits (~1e-16 each)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-12)
    # per-token CE of each document's next tokens (targets inside the document only)
    target = packed[:, 1:].clone()
    target[doc_ids[:, 1:] != doc_ids[:, :-1]] = -100
    per_packed = F.cross_entropy(together[0, :-1], target[0], reduction="none")
    per_alone = F.cross_entropy(alone[0, :-1], target[0], reduction="none")
    torch.testing.assert_close(per_packed, per_alone, rtol=0, atol=1e-12)
    assert (together - model(input_ids=packed).logits).abs().max() > 1e-3  # boundary matters
