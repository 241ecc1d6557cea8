"""With the student sharded by FSDP2 over 2 processes (torchrun, gloo, CPU), the trainer's loss
and the student's gradients equal those of 1 unsharded process on the same global batch. The
worker shards the lm_head as a unit of its own and reshards every unit after forward, the root
included (transformers' FSDP2 default): the logit loss is computed by a hook that runs inside
the lm_head's forward before FSDP reshards it, and leaves the model as its output, so FSDP
gathers the weights again before the backward. A weight still in shards is refused by name."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tests.ddp_launch import TORCHRUN, launch

WORKER = Path(__file__).with_name("distill_fsdp_worker.py")


def test_fsdp2_sharded_student_matches_one_process(tmp_path):
    sharded = launch(WORKER, tmp_path / "fsdp", TORCHRUN, per_device=2)
    single = launch(WORKER, tmp_path / "single", [sys.executable], per_device=4)
    assert sharded["world_size"] == 2 and single["world_size"] == 1
    torch.testing.assert_close(sharded["loss"], single["loss"], rtol=1e-5, atol=0)
    assert sharded["grads"].keys() == single["grads"].keys()
    assert single["dtensor_error"] is None
    assert "student_weight is a DTensor (sharded" in sharded["dtensor_error"]
    for name, grad in single["grads"].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(sharded["grads"][name], grad, rtol=1e-4, atol=1e-6,
                                   msg=name)
