"""With feature terms, a 2-process DDP run (torchrun, gloo, CPU) takes the same first step as
1 process on the same global batch: same loss, same student and projections (whose gradients
the trainer averages itself: they live outside the DDP-wrapped student)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("features_ddp_worker.py")
ROOT = WORKER.parent.parent


def launch(out: Path, launcher: list[str], per_device: int) -> dict:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [*launcher, str(WORKER), str(out), str(per_device)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out / "result.pt")


def test_two_process_ddp_step_equals_one_process(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"]
    ddp = launch(tmp_path / "ddp", torchrun, per_device=2)
    single = launch(tmp_path / "single", [sys.executable], per_device=4)
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert abs(ddp["loss"] - single["loss"]) <= 1e-5 * abs(single["loss"])
    for group in ("params", "projections"):
        for name, p in single[group].items():
            assert torch.allclose(ddp[group][name], p, rtol=1e-5, atol=1e-7), name
