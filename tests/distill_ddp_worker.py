"""Run by test_distill_ddp.py, under torchrun or alone: one SGD step of DistillationTrainer
on a fixed global batch of 4 rows; the main process saves the logged loss and the updated
student parameters to OUT/result.pt.

usage: distill_ddp_worker.py OUT PER_DEVICE_BATCH
"""

import os
import sys
from pathlib import Path

import torch

from fastkd.distill import DistillationTrainer, LogitKD
from fastkd.distill.data import CausalCollator
from tests.ddp_launch import exit_worker
from tests.distill_helpers import args, llama, qwen2, rows


def main() -> None:
    out, per_device = Path(sys.argv[1]), int(sys.argv[2])
    # CPU in both runs (also on a GPU machine), so that they compare like with like
    backend = {"ddp_backend": "gloo"} if "WORLD_SIZE" in os.environ else {}
    student = qwen2()
    trainer = DistillationTrainer(
        model=student, teachers=[llama()], kd=LogitKD(hard_weight=0.5),
        args=args(out, per_device_train_batch_size=per_device, use_cpu=True, **backend),
        train_dataset=rows(4, seed=11), data_collator=CausalCollator(0),
    )
    trainer.train()
    if trainer.is_world_process_zero():
        torch.save({"loss": trainer.state.log_history[0]["loss"],
                    "world_size": trainer.args.world_size,
                    "params": {n: p.detach() for n, p in student.named_parameters()}},
                   out / "result.pt")
    exit_worker()


if __name__ == "__main__":
    main()
