"""A 2-process DDP run (torchrun, gloo, CPU) takes the same first step as 1 process on the same
global batch: same logged loss, same updated parameters."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.ddp_launch import ddp_and_single

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_two_process_ddp_step_equals_one_process(tmp_path):
    ddp, single = ddp_and_single(WORKER, tmp_path)
    assert abs(ddp["loss"] - single["loss"]) <= 1e-5 * abs(single["loss"])
    for name, p in single["params"].items():
        assert torch.allclose(ddp["params"][name], p, rtol=1e-5, atol=1e-7), name
