"""Run by test_distill_teacher_fsdp.py, under torchrun or alone: the trainer's distillation loss
(logit KD with hard CE, plus hidden-state alignment, which captures the teacher's sharded
layers) of a fixed global batch of 4 rows, with the teacher's decoder layers sharded by
`shard_teacher` (FSDP2) across the processes, or whole in a single process. Saves the summed
loss over all processes, the summed student gradients, and the size of one teacher weight's
local shard against the full weight to OUT/result.pt.

usage: distill_teacher_fsdp_worker.py OUT [ignored]
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from fastkd.distill import DistillationTrainer, FeatureSettings, LogitKD
from fastkd.distill.data import CausalCollator
from fastkd.distill.teacher_shard import shard_teacher
from tests.ddp_launch import exit_worker
from tests.distill_helpers import args, llama, qwen2, rows


def main() -> None:
    out = Path(sys.argv[1])
    sharded = "WORLD_SIZE" in os.environ
    if sharded:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    teacher = shard_teacher(llama(layers=3), torch.device("cpu"))
    weight = teacher.model.layers[1].mlp.up_proj.weight
    local = weight.to_local() if isinstance(weight, DTensor) else weight
    student = qwen2(layers=2, tied=False)
    trainer = DistillationTrainer(
        model=student, teachers=[teacher], kd=LogitKD(hard_weight=0.5, temperature=1.5),
        features=FeatureSettings(hidden_weight=0.5),
        args=args(out, use_cpu=True, logging_steps=1000), train_dataset=rows(4, seed=11),
        data_collator=CausalCollator(0),
    )
    batch = CausalCollator(0)(rows(4, seed=11))
    part = 4 // world
    mine = {k: v[rank * part:(rank + 1) * part] for k, v in batch.items()}
    student.train()
    loss_sum, _ = trainer.distill_loss_sum(student, mine)
    loss_sum.backward()
    total = loss_sum.detach().clone()
    grads = {n: p.grad.detach().clone() for n, p in student.named_parameters()}
    if sharded:
        dist.all_reduce(total)
        for grad in grads.values():
            dist.all_reduce(grad)
    if rank == 0:
        torch.save({"loss": total, "world_size": world, "grads": grads,
                    "teacher_local_numel": local.numel(), "teacher_numel": weight.numel(),
                    "teacher_requires_grad": any(p.requires_grad for p in teacher.parameters())},
                   out / "result.pt")
    exit_worker()


if __name__ == "__main__":
    main()
