"""The little of torch.distributed extraction needs: rank, world size, barriers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def init_distributed() -> DistContext:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistContext()
    if not torch_dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch_dist.init_process_group(backend)
    return DistContext(
        rank=torch_dist.get_rank(),
        world_size=torch_dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def barrier(context: DistContext) -> None:
    if context.world_size > 1:
        torch_dist.barrier()


def broadcast_from_rank0(context: DistContext, value):
    """``value`` as rank 0 has it, on every rank (a picklable object; e.g. an error message)."""
    if context.world_size == 1:
        return value
    box = [value if context.rank == 0 else None]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]
