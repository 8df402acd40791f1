"""The one place that talks to ``torch.distributed``."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True inside an initialized process group."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_mean(value: Tensor) -> Tensor:
    """Mean of ``value`` over all ranks (a no-op outside DDP). Returns a new tensor."""
    if not is_distributed():
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_list(items: list) -> list:
    """Concatenate a picklable list from every rank, in rank order (identity outside DDP)."""
    if not is_distributed():
        return items
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from ``src`` to every rank (identity outside DDP)."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


__all__ = [
    "all_gather_list",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "is_distributed",
    "rank",
]
