"""Run by test_distill_ddp.py and test_features_ddp.py, under torchrun or alone: one SGD step
of DistillationTrainer on a fixed global batch of 4 rows, with every feature term when asked;
the main process saves the logged loss, the updated student parameters and the updated
projections to OUT/result.pt.

usage: ddp_worker.py OUT PER_DEVICE_BATCH [features]
"""

import os
import sys
from pathlib import Path

import torch

from fastkd.distill import DistillationTrainer, FeatureSettings, LogitKD
from fastkd.distill.data import CausalCollator
from tests.ddp_launch import exit_worker
from tests.distill_helpers import args, llama, qwen2, rows

FEATURES = FeatureSettings(hidden_weight=0.5, attention_weight=0.3, relation_heads=4,
                           ffn_weight=0.2)


def main() -> None:
    out, per_device = Path(sys.argv[1]), int(sys.argv[2])
    features = sys.argv[3:] == ["features"]
    # CPU in both runs (also on a GPU machine), so that they compare like with like
    backend = {"ddp_backend": "gloo"} if "WORLD_SIZE" in os.environ else {}
    student = qwen2(layers=2 if features else 1)
    trainer = DistillationTrainer(
        model=student, teachers=[llama()], kd=LogitKD(hard_weight=0.5),
        features=FEATURES if features else None,
        args=args(out, per_device_train_batch_size=per_device, use_cpu=True, **backend),
        train_dataset=rows(4, seed=11), data_collator=CausalCollator(0),
    )
    trainer.train()
    if trainer.is_world_process_zero():
        projections = trainer.features.state_dict() if features else {}
        torch.save({"loss": trainer.state.log_history[0]["loss"],
                    "world_size": trainer.args.world_size,
                    "params": {n: p.detach() for n, p in student.named_parameters()},
                    "projections": projections},
                   out / "result.pt")
    exit_worker()


if __name__ == "__main__":
    main()
