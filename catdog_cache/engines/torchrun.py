"""torchrun support: one process per GPU (NCCL), per share of a GPU or of the CPU (Gloo), each extracting a shard.

Without torchrun (no WORLD_SIZE > 1 in the environment) nothing here runs and extraction is single-process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

import torch

from ..errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list[T]) -> list[T]:
        """This rank's share: a contiguous, balanced slice of the sorted list (sizes differ by at most one)."""
        base, extra = divmod(len(items), self.world)
        start = self.rank * base + min(self.rank, extra)
        return items[start : start + base + (self.rank < extra)]

    def barrier(self) -> None:
        torch.distributed.barrier()

    def close(self) -> None:
        """Leave the group cleanly: a rank that exits while a peer still finishes the last collective makes Gloo
        abort that peer (SIGABRT), so everyone meets once more, then the group is destroyed."""
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def gather(self, obj: T) -> list[T]:
        out: list[T | None] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out  # type: ignore[return-value]


def _env_int(name: str, default: str | None, low: int, high: int | None = None) -> int:
    """A torchrun variable as an integer in [low, high): one line naming it when it is missing or malformed."""
    text = os.environ.get(name, default)
    if text is None:
        raise InputError(f"{name} is not set, but WORLD_SIZE={os.environ['WORLD_SIZE']} says this is a torchrun "
                         "rank: start it with torchrun, or unset WORLD_SIZE")
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"{name}={text!r} in the environment is not an integer (torchrun sets it)") from None
    if value < low or (high is not None and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f"at least {low}"
        raise InputError(f"{name}={value} in the environment must be {bound}")
    return value


def placement(device: str, local_rank: int, local_world: int, gpus: int) -> tuple[str, int | None]:
    """(process-group backend, this rank's GPU on its node or None). One GPU per rank: NCCL. More ranks on a node
    than GPUs (two ranks on one GPU): NCCL refuses to run two ranks on one device, so the ranks share the GPUs
    round-robin (cuda:local_rank % gpus) and their collectives, a barrier and a few small gathers of Python objects,
    go over Gloo on the CPU. No GPU, or --device cpu: Gloo."""
    if device == "cpu" or gpus == 0:
        return "gloo", None
    return ("nccl" if local_world <= gpus else "gloo"), local_rank % gpus


def from_env(device: str = "auto") -> Dist | None:
    """Join the process group torchrun describes, once, with the backend and GPU `placement` chooses. A broken
    environment (WORLD_SIZE=abc, no RANK, no MASTER_ADDR) is one line naming the variable, before any rendezvous."""
    world = _env_int("WORLD_SIZE", "1", 1)
    if world <= 1:
        return None
    rank, local_rank = _env_int("RANK", None, 0, world), _env_int("LOCAL_RANK", "0", 0)
    if not torch.distributed.is_initialized():
        if not os.environ.get("MASTER_ADDR"):
            raise InputError(f"MASTER_ADDR is not set, but WORLD_SIZE={world} says this is a torchrun rank: start it "
                             "with torchrun, or unset WORLD_SIZE")
        _env_int("MASTER_PORT", None, 1, 65536)
        local_world = _env_int("LOCAL_WORLD_SIZE", str(world), 1)
        backend, gpu = placement(device, local_rank, local_world,
                                 torch.cuda.device_count() if torch.cuda.is_available() else 0)
        if gpu is not None:
            torch.cuda.set_device(gpu)  # "cuda" (resolve_device) is now this rank's GPU
        torch.distributed.init_process_group(backend=backend)
    return Dist(rank, world, local_rank)
