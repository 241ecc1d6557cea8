"""Run by test_distill_fsdp.py, under torchrun or alone: the trainer's distillation loss (logit
KD with hard CE, and every feature term) of a fixed global batch of 4 rows, with the student
sharded by FSDP2 (`fully_shard` per decoder layer, on the untied lm_head, and on the whole
model, each resharded after its forward as transformers' FSDP2 settings do) across the
processes, or
not sharded in a single process. Saves the summed loss over all processes, the full gradient
of every student parameter, and the error fused_kd_loss raises for a sharded (DTensor) weight
to OUT/result.pt.

HF Trainer's FSDP needs a GPU (accelerate falls back to DDP on CPU), so the worker shards the
student itself and calls the trainer's loss as the training step would.

usage: distill_fsdp_worker.py OUT [ignored]
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from fastkd import fused_kd_loss
from fastkd.distill import DistillationTrainer, FeatureSettings, LogitKD
from fastkd.distill.data import CausalCollator
from tests.ddp_launch import exit_worker
from tests.distill_helpers import args, llama, qwen2, rows


def main() -> None:
    out = Path(sys.argv[1])
    sharded = "WORLD_SIZE" in os.environ
    if sharded:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    student = qwen2(layers=2, tied=False)
    trainer = DistillationTrainer(
        model=student, teachers=[llama()], kd=LogitKD(hard_weight=0.5),
        features=FeatureSettings(hidden_weight=0.5, attention_weight=0.3, relation_heads=4,
                                 ffn_weight=0.2),
        args=args(out, use_cpu=True, logging_steps=1000), train_dataset=rows(4, seed=11),
        data_collator=CausalCollator(0),
    )
    batch = CausalCollator(0)(rows(4, seed=11))
    part = 4 // world
    local = {k: v[rank * part:(rank + 1) * part] for k, v in batch.items()}
    names = [name for name, _ in student.named_parameters()]
    dtensor_error = None
    if sharded:
        for unit in [*student.model.layers, student.lm_head]:
            fully_shard(unit, reshard_after_forward=True)
        fully_shard(student, reshard_after_forward=True)
        sharded_weight = student.model.layers[0].mlp.up_proj.weight  # (32, 16) in shards
        assert isinstance(sharded_weight, DTensor)
        try:
            fused_kd_loss(torch.randn(2, 16), sharded_weight, torch.randn(2, 8),
                          torch.randn(32, 8))
        except TypeError as error:
            dtensor_error = str(error)
    student.train()
    loss_sum, _ = trainer.distill_loss_sum(student, local)
    # FSDP averages gradients over the processes; scale so that they are those of the sum.
    (loss_sum * world).backward()
    grads = {}
    for name, p in zip(names, student.parameters(), strict=True):
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        grads[name] = grad.detach().clone()
    total = loss_sum.detach().clone()
    if sharded:
        dist.all_reduce(total)
    if rank == 0:
        torch.save({"loss": total, "world_size": world, "grads": grads,
                    "dtensor_error": dtensor_error}, out / "result.pt")
    exit_worker()


if __name__ == "__main__":
    main()
