"""`fastkd capture` under torchrun (2 processes, gloo, CPU): each process writes its own
shards, and the capture equals a 1-process one; one training step from it over 2 processes
equals one step on 1 process over the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastkd.distill.signals import CapturedSignals
from tests.ddp_launch import ddp_and_single
from tests.distill_helpers import llama, tokenizer, write_texts
from tests.test_capture_signals import spread

WORKER = Path(__file__).with_name("capture_signals_worker.py")


def test_two_process_capture_and_step_equal_one_process(tmp_path):
    models = {"teacher": spread(llama(), 30.0),
              "student": spread(llama(width=16, tied=True, layers=1, seed=3), 20.0)}
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
        tokenizer().save_pretrained(tmp_path / name)
    data = write_texts(tmp_path / "train.jsonl", 12)
    ddp, single = ddp_and_single(WORKER, tmp_path, str(tmp_path / "teacher"),
                                 str(tmp_path / "student"), str(data))
    two, one = CapturedSignals(tmp_path / "ddp" / "capture"), CapturedSignals(
        tmp_path / "single" / "capture")
    assert two.meta == one.meta and two.meta.shards >= 2
    written = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text())["tokens"]
               for r in (0, 1)]
    assert min(written) > 0 and sum(written) == one.meta.tokens  # each wrote its own shards
    for row in range(one.meta.rows):
        a, b = two.row(row), one.row(row)
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["ids"], b["ids"])
        # the same fp32 teacher forward, in batches of 2 rows instead of 4 (other padding)
        assert torch.allclose(a["logits"], b["logits"], rtol=1e-5, atol=1e-5)
        assert torch.allclose(a["lse"], b["lse"], rtol=1e-5, atol=1e-5)
    assert abs(ddp["loss"] - single["loss"]) <= 1e-5 * abs(single["loss"])
    for name, p in single["params"].items():
        assert torch.allclose(ddp["params"][name], p, rtol=1e-5, atol=1e-7), name
