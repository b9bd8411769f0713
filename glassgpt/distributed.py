"""Running one training job over several processes with torch.distributed (launched by torchrun).

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them this is a single process and every helper
here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from glassgpt.errors import UserError


@dataclass
class DistInfo:
    enabled: bool
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def master(self) -> bool:
        """Rank 0 logs, evaluates and writes checkpoints."""
        return self.rank == 0


def setup(backend: str, device: str) -> DistInfo:
    """Join the process group if launched by torchrun; pick this rank's device."""
    if int(os.environ.get("RANK", -1)) == -1:
        return DistInfo(enabled=False, device=device)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    elif backend == "nccl":
        backend = "gloo"  # nccl needs GPUs; gloo is PyTorch's CPU backend
    dist.init_process_group(backend=backend)
    return DistInfo(enabled=True, rank=rank, local_rank=local_rank, world_size=world, device=device)


def split_grad_accum(steps: int, world_size: int) -> int:
    """gradient_accumulation_steps counts micro-steps of the whole job; each rank does its share."""
    if steps % world_size:
        raise UserError(f"gradient_accumulation_steps={steps} is not divisible by the {world_size} processes; "
                        f"use a multiple of {world_size}")
    return steps // world_size


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
