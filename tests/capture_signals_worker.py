"""Run by test_capture_signals_ddp.py under torchrun or alone: `fastkd capture` (topk) of a
teacher over a data file (each process writes its shards), then one SGD step of training from
that capture; the main process saves the logged loss and the updated student parameters to
OUT/result.pt, and every process the tokens it captured to OUT/rank<r>.json.

usage: capture_signals_worker.py OUT PER_DEVICE_BATCH TEACHER STUDENT DATA
"""

import json
import os
import sys
from pathlib import Path

import torch

from fastkd.distill.capture_signals import run_capture
from fastkd.distill.config import DistillConfig
from fastkd.distill.run import prepare
from tests.ddp_launch import exit_worker


def main() -> None:
    out, per_device = Path(sys.argv[1]), int(sys.argv[2])
    teacher, student, data = sys.argv[3:6]
    common = dict(student=student, data=data, seq_len=16, batch_size=per_device, seed=0)
    report, = run_capture(DistillConfig(
        teachers=[teacher], capture_kind="topk", capture_k=8, capture_out=str(out / "capture"),
        capture_rows_per_shard=4, **common))
    rank = int(os.environ.get("RANK", 0))
    (out / f"rank{rank}.json").write_text(json.dumps({"tokens": report.tokens}))
    # CPU in both runs (also on a GPU machine), so that they compare like with like
    backend = {"ddp_backend": "gloo"} if "WORLD_SIZE" in os.environ else {}
    job = prepare(DistillConfig(
        teacher_signals=[str(out / "capture")], steps=1, learning_rate=0.1, hard_weight=0.5,
        logging_steps=1, output_dir=str(out / "run"), **common,
        training_args={"optim": "sgd", "lr_scheduler_type": "constant", "use_cpu": True,
                       "save_strategy": "no", "disable_tqdm": True, **backend}))
    job.trainer.train()
    if job.trainer.is_world_process_zero():
        torch.save({"loss": job.trainer.state.log_history[0]["loss"],
                    "world_size": job.trainer.args.world_size,
                    "params": {n: p.detach() for n, p in job.trainer.model.named_parameters()}},
                   out / "result.pt")
    exit_worker()


if __name__ == "__main__":
    main()
