"""Running under torchrun: which process this is, the process group, and summing results across processes.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK (and MASTER_ADDR/MASTER_PORT for the env:// rendezvous). Each rank
scores a contiguous slice of the evaluation's batches; see `split`.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import SqueezeError


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Processes:
    """This process's place in a torchrun launch; a single process when WORLD_SIZE is unset."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise SqueezeError("WORLD_SIZE/RANK/LOCAL_RANK: not integers; launch with torchrun") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise SqueezeError(f"RANK {rank} / WORLD_SIZE {world_size}: inconsistent; launch with torchrun")
    return Processes(rank, world_size, local_rank)


def start(procs: Processes, device: torch.device) -> bool:
    """Join the process group (nccl on CUDA, gloo otherwise). True when this call created it, so that the caller
    destroys it; a training script that already has one keeps it."""
    if not procs.distributed or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=procs.rank, world_size=procs.world_size)
    return True


def stop(created: bool) -> None:
    if created:
        dist.destroy_process_group()


def split(n: int, procs: Processes) -> range:
    """The contiguous share of n items (batches) that this rank handles; shares differ by at most one."""
    return range(n * procs.rank // procs.world_size, n * (procs.rank + 1) // procs.world_size)


def sum_across(values: torch.Tensor, procs: Processes) -> torch.Tensor:
    """Elementwise sum over ranks. Callers put each rank's results in its own entries and zeros elsewhere, so the
    sum only gathers them (x + 0 is exact) and the totals do not depend on the number of processes."""
    if procs.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def max_across(value: float, procs: Processes, device: torch.device) -> float:
    """The largest of each rank's `value` (e.g. the slowest rank's time)."""
    if not procs.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
