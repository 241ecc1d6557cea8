"""Gradient bookkeeping of the feature projections inside `transformers.Trainer`.

The projections are trained by the Trainer's optimizer but live outside the student, so the
Trainer neither clears their gradients after a step (it calls `model.zero_grad()`) nor averages
them across DDP processes. This callback does both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback


class ProjectionUpdates(TrainerCallback):
    """Averages `module`'s gradients over processes before each optimizer step and clears them
    after it."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.world_size <= 1:
            return
        for p in self.module.parameters():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.distributed.all_reduce(grad)  # DDP scaled the loss by the process count
            p.grad = grad / args.world_size

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.module.zero_grad(set_to_none=True)
