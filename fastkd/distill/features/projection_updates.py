"""Gradient bookkeeping of the feature projections inside `transformers.Trainer`.

The projections are trained by the Trainer's optimizer but live outside the student, so the
Trainer neither clears their gradients after a step (it calls `model.zero_grad()`), nor
averages them across DDP processes, nor clips them. This callback does all three (the clipping
with the Trainer's `max_grad_norm`, over the projections' own gradient norm).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback


class ProjectionUpdates(TrainerCallback):
    """Averages `module`'s gradients over processes and clips them before each optimizer step,
    and clears them after it."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.world_size > 1:
            for p in self.module.parameters():
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                torch.distributed.all_reduce(grad)  # DDP scaled the loss by the process count
                p.grad = grad / args.world_size
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), args.max_grad_norm)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.module.zero_grad(set_to_none=True)
