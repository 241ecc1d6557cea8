"""Packing with document boundaries: positions restart at each document and attention stays
inside it, so a packed batch gives each document's tokens the loss they have run one by one."""

from __future__ import annotations

import pytest
import torch

from fastkd.distill import DistillationTrainer, LogitKD
from fastkd.distill.capture import _forward_kwargs, final_hidden
from fastkd.distill.data import CausalCollator
from fastkd.distill.evaluate import perplexity
from fastkd.distill.loss import IGNORE_INDEX
from fastkd.distill.packing import pack
from tests.distill_helpers import args, llama, reference_loss

SEQ_LEN = 12
LENGTHS = (5, 4, 3, 6, 5)  # blocks of 5 + 4 + 3 = 12 and 6 + 5 = 11 tokens (then padding)


def documents() -> list[tuple[list[int], list[bool]]]:
    g = torch.Generator().manual_seed(0)
    docs = []
    for n in LENGTHS:
        ids = torch.randint(3, 97, (n,), generator=g).tolist()
        docs.append((ids, [True] * n))
    return docs


def test_pack_restarts_positions_and_ignores_each_first_token():
    docs = [([10, 11, 12], [True] * 3), ([20, 21], [False, True]), ([30, 31, 32, 33], [True] * 4)]
    blocks = pack(docs, 4)
    assert blocks["input_ids"] == [[10, 11, 12, 20], [21, 30, 31, 32], [33]]
    assert blocks["position_ids"] == [[0, 1, 2, 0], [0, 0, 1, 2], [0]]
    ignore = IGNORE_INDEX
    assert blocks["labels"] == [[ignore, 11, 12, ignore], [21, ignore, 31, 32], [33]]


def test_collator_pads_packed_rows_as_a_segment_of_their_own():
    batch = CausalCollator(0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7],
                                "position_ids": [0, 0, 1]}, {"input_ids": [8], "labels": [8],
                                                             "position_ids": [0]}])
    assert batch["position_ids"].tolist() == [[0, 0, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def packed_batch() -> dict[str, torch.Tensor]:
    blocks = pack(documents(), SEQ_LEN)
    assert [len(b) for b in blocks["input_ids"]] == [12, 11]
    rows = [dict(zip(blocks, values, strict=True)) for values in zip(*blocks.values(),
                                                                      strict=True)]
    return CausalCollator(0)(rows)


@pytest.fixture(params=["eager", "sdpa"])
def models(request):
    teacher, student = llama().double(), llama(width=16, seed=3, layers=1).double()
    for model in (teacher, student):
        model.set_attn_implementation(request.param)
    return teacher, student


def test_packed_hidden_states_equal_the_documents_run_alone(models):
    teacher, _ = models
    batch = packed_batch()
    with torch.no_grad():
        packed = final_hidden(teacher, batch["input_ids"], batch["attention_mask"],
                              batch["position_ids"])
        crossing = final_hidden(teacher, batch["input_ids"], batch["attention_mask"])
        starts = [0, 5, 9, 0, 6]
        rows = [0, 0, 0, 1, 1]
        for (ids, _), row, start in zip(documents(), rows, starts, strict=True):
            alone = final_hidden(teacher, torch.tensor([ids]), None)[0]
            got = packed[row, start:start + len(ids)]
            # all float64: the same sums in another order differ by a few units of 2^-52
            # relative; 1e-10 is far below any cross-document leak
            assert torch.allclose(got, alone, rtol=1e-10, atol=1e-10)
        # without the boundaries, later documents see earlier ones
        assert not torch.allclose(crossing[0, 5:9], packed[0, 5:9], atol=1e-3)


def test_packed_loss_equals_the_documents_run_one_by_one(tmp_path, models):
    teacher, student = models
    settings = dict(temperature=2.0, hard_weight=0.5)
    trainer = DistillationTrainer(model=student, args=args(tmp_path), teachers=[teacher],
                                  kd=LogitKD(**settings, backend="torch"),
                                  data_collator=CausalCollator(0), train_dataset=[])
    batch = packed_batch()
    loss = trainer.compute_loss(student, dict(batch))
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    count = sum(len(ids) - 1 for ids, _ in documents())
    total = sum(reference_loss(student, [teacher], CausalCollator(0)([{"input_ids": ids}]),
                               **settings) * (len(ids) - 1) for ids, _ in documents())
    (total / count).backward()
    # float64 throughout (models, fused loss, reference): agreement to ~1e-15 relative;
    # 1e-10 leaves room for the summation order and excludes any leak across documents
    assert count == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert abs(loss.item() - total.item() / count) <= 1e-10 * abs(total.item() / count)
    for name, p in student.named_parameters():
        err = (packed_grads[name] - p.grad).norm() / p.grad.norm()
        assert err < 1e-9, (name, float(err))


def test_flash_attention_gets_the_varlen_kwargs_of_every_row():
    """Flash attention finds packed sequences in position_ids of one row only; for a batch of
    rows it is given the boundaries of all documents of the flattened batch."""
    batch = packed_batch()
    model = llama()
    kwargs = _forward_kwargs(model, batch["input_ids"], batch["attention_mask"],
                             batch["position_ids"])
    assert kwargs["attention_mask"] is None and "cu_seq_lens_q" not in kwargs  # eager / sdpa
    model.config._attn_implementation = "flash_attention_2"
    kwargs = _forward_kwargs(model, batch["input_ids"], batch["attention_mask"],
                             batch["position_ids"])
    # documents of 5, 4, 3 | 6, 5 tokens and the second row's one padding token
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 5, 9, 12, 18, 23, 24]
    assert kwargs["cu_seq_lens_k"].tolist() == [0, 5, 9, 12, 18, 23, 24]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 6


def test_held_out_perplexity_of_packed_rows_equals_the_documents_alone(models):
    teacher, _ = models
    blocks = pack(documents(), SEQ_LEN)
    packed = [dict(zip(blocks, values, strict=True)) for values in zip(*blocks.values(),
                                                                        strict=True)]
    alone = [{"input_ids": ids} for ids, _ in documents()]
    collate = CausalCollator(0)
    # float64: the same per-token losses summed in another order
    assert abs(perplexity(teacher, packed, collate) / perplexity(teacher, alone, collate)
               - 1) < 1e-10
