"""Run a DDP worker script under torchrun (2 processes, gloo) and as 1 process, for the tests
that compare a 2-process step with a 1-process step on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def exit_worker() -> None:
    """End a worker process at once, its results saved, running no destructor.

    torch's gloo teardown at interpreter exit can abort ("terminate called without an active
    exception") or deadlock (ProcessGroupGloo's destructor joins its worker thread while
    holding the GIL that the thread waits for to release a finished collective's tensors);
    both were seen here, so the test workers skip it.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(worker: Path, out: Path, launcher: list[str], per_device: int, *extra: str) -> dict:
    """Run ``worker out per_device *extra`` under ``launcher``; returns the result.pt it saves."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [*launcher, str(worker), str(out), str(per_device), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out / "result.pt")


def ddp_and_single(worker: Path, tmp_path: Path, *extra: str) -> tuple[dict, dict]:
    """The results of 2 processes x 2 sequences and of 1 process x 4 sequences."""
    ddp = launch(worker, tmp_path / "ddp", TORCHRUN, 2, *extra)
    single = launch(worker, tmp_path / "single", [sys.executable], 4, *extra)
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    return ddp, single
