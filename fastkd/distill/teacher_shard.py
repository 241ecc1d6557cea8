"""Teachers sharded with FSDP2 under torchrun (`teacher_sharding: fsdp`).

Each decoder layer of a teacher is `fully_shard`-ed over all processes: a process keeps 1/world
of the layer weights, gathers a layer for its forward and frees it after (forward only: the
teacher has no gradients and no optimizer state). The embedding, final norm and lm_head stay
whole on every process, since the fused loss reads the lm_head weight and the final hidden
state directly. Every process must run each teacher forward (the trainer does: each process
computes the loss of its own micro-batch).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def shard_teacher(teacher: nn.Module, device: torch.device) -> nn.Module:
    """Shard `teacher`'s decoder layers over the default process group (in place); with one
    process (or none) the teacher is left whole. Returns the teacher."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        logger.info("teacher_sharding fsdp: one process, the teacher stays whole")
        return teacher
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    teacher.to(device).eval().requires_grad_(False)
    mesh = init_device_mesh(device.type, (world,))
    layers = getattr(teacher.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"teacher_sharding fsdp: {type(teacher).__name__} has no decoder "
                         "layers list (model.get_decoder().layers) to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    return teacher
