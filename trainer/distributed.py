"""The launcher's view of this process (rank, world, device) and the default process group.

Parallel layouts and their groups live in parallel_state; this module only brings the world up
and down and offers the two world-wide agreements the trainer needs before any layout exists.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

import parallel_state.groups


@dataclass(frozen=True)
class RuntimeEnv:
    """Where this process sits in the launch (torchrun's environment variables)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_writer(self) -> bool:
        """The one rank that writes shared files (config, metrics, checkpoints of replicated state)."""
        return self.rank == 0

    @staticmethod
    def from_environ(environ: dict | None = None) -> RuntimeEnv:
        env = os.environ if environ is None else environ
        world = int(env.get("WORLD_SIZE", "1"))
        return RuntimeEnv(rank=int(env.get("RANK", "0")), world_size=world,
                          local_rank=int(env.get("LOCAL_RANK", "0")),
                          local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))))


def select_device(env: RuntimeEnv, requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def init_world(env: RuntimeEnv, device: torch.device, timeout_s: float = 600.0) -> None:
    """Create the default process group when there is more than one rank: gloo on CPU; on CUDA nccl
    for device tensors plus gloo for the small CPU ones (token counts, checkpoint agreement)."""
    if env.world_size == 1 or dist.is_initialized():
        return
    backend = parallel_state.groups.default_backend(device)
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)


def shutdown_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_from_writer(value: Any) -> Any:
    """Every rank gets rank 0's `value` (e.g. the run directory chosen from rank 0's clock)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()

