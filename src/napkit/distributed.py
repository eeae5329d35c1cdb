"""Data parallelism on the existing engine: torch.distributed, launched by ``torchrun``.

Without torchrun (no ``WORLD_SIZE`` in the environment) everything runs single-process. Under
torchrun each process joins the group with ``gloo`` on CPU or ``nccl`` on GPU (overridable);
only rank 0 writes checkpoints, outputs and MLflow records, the others wait at a barrier.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from napkit.errors import unknown_choice

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world() -> World:
    """The current process group's rank and size (single process when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World()


def init_from_env(backend: str = "auto") -> World:
    """Join the process group torchrun describes in the environment; a no-op when not under torchrun."""
    if backend not in BACKENDS:
        raise unknown_choice("distributed backend", backend, BACKENDS)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return world()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return world()


def device_for(name: str, w: World) -> torch.device:
    """``auto``: this rank's GPU when present, else cpu; an explicit name is used as given."""
    if name == "auto":
        return torch.device(f"cuda:{w.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def barrier() -> None:
    if world().distributed:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
