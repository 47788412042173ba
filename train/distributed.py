"""Process-group set-up from torchrun's environment, and the few collectives the trainer uses."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import TrainError


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def choose_device(requested: str, local_rank: int) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is usable, else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError(f"--device {requested}: CUDA is not available on this machine")
        if requested == "cuda":
            return torch.device("cuda", local_rank)
    return torch.device(requested)


def init_distributed(requested_device: str) -> Ranks:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, ...) or run alone.

    NCCL on CUDA, gloo on the CPU. A single process started without torchrun never creates a
    process group, so nothing here needs a free port.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(requested_device, local_rank)
    if world_size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
    return Ranks(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def average_scalars(values: dict[str, float], ranks: Ranks) -> dict[str, float]:
    """Mean of each scalar over the ranks (every rank must call it, with the same keys)."""
    if not ranks.distributed:
        return values
    names = sorted(values)
    device = ranks.device if dist.get_backend() == "nccl" else torch.device("cpu")
    packed = torch.tensor([values[n] for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    packed /= ranks.world_size
    return dict(zip(names, packed.tolist(), strict=True))


def gather_to_main(obj: Any, ranks: Ranks) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (a list in rank order), ``None`` elsewhere.

    Only the trainer's own in-process results travel this way (pickled by torch.distributed
    between our ranks), never anything read from a shard.
    """
    if not ranks.distributed:
        return [obj]
    gathered: list[Any] | None = [None] * ranks.world_size if ranks.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def any_rank(flag: bool, ranks: Ranks) -> bool:
    """True on every rank if ``flag`` is True on any (every rank must call it)."""
    if not ranks.distributed:
        return flag
    device = ranks.device if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def max_over_ranks(values: list[float], ranks: Ranks) -> list[float]:
    """Each value's maximum over the ranks, on every rank: one all-reduce for all of them."""
    if not ranks.distributed:
        return list(values)
    device = ranks.device if dist.get_backend() == "nccl" else torch.device("cpu")
    packed = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return packed.tolist()
