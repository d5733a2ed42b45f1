"""Work split across the processes of a torch.distributed group (torchrun, 1..8 GPUs), gathered on every rank.

Compile's expensive per-tensor work (GPTQ, the budget allocator's pricing of each tensor's grids) depends only on
the tensor and its Hessian, so each rank computes every world_size-th item and all ranks exchange results: N GPUs
take 1/N of the time and every rank ends with the same, complete answer (so rank 0 can write the artifact). Without
an initialised group (or with one process) it is a plain loop. The gathered objects are our own results between
our own processes (torch.distributed's object collectives pickle them); nothing from outside is unpickled.
"""
import torch.distributed as dist


def group_size() -> tuple[int, int]:
    """(rank, world size) of the current torch.distributed group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(obj) -> list:
    """[each rank's `obj`], in rank order, on every rank ([obj] without a group)."""
    rank, world = group_size()
    if world == 1:
        return [obj]
    parts = [None] * world
    dist.all_gather_object(parts, obj)
    return parts


def map_items(fn, items: list) -> list:
    """[fn(item) for item in items], the work dealt round-robin across ranks and the results gathered on all."""
    rank, world = group_size()
    if world == 1:
        return [fn(item) for item in items]
    merged = {}
    for part in gather({i: fn(item) for i, item in enumerate(items) if i % world == rank}):
        merged.update(part)
    return [merged[i] for i in range(len(items))]
