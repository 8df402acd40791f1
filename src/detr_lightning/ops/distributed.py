"""The one place that talks to ``torch.distributed``."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True inside an initialized process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _all_reduced(value: Tensor, op: dist.ReduceOp) -> Tensor:
    """A copy of ``value`` reduced with ``op`` over all ranks, on a device the backend takes
    (a host tensor goes to this rank's GPU under NCCL). Every rank must call it."""
    if value.device.type == "cpu" and dist.get_backend() == "nccl":
        value = value.to(torch.device("cuda", torch.cuda.current_device()))
    else:
        value = value.clone()
    dist.all_reduce(value, op=op)
    return value


def all_reduce_sum(value: Tensor) -> Tensor:
    """Sum of ``value`` over all ranks (``value`` itself outside DDP). Returns a new tensor
    outside DDP too."""
    return _all_reduced(value, dist.ReduceOp.SUM) if is_distributed() else value.clone()


def all_reduce_mean(value: Tensor) -> Tensor:
    """Mean of ``value`` over all ranks (a no-op outside DDP). Returns a new tensor."""
    if not is_distributed():
        return value
    return _all_reduced(value, dist.ReduceOp.SUM) / dist.get_world_size()


def any_rank(flag: Tensor) -> bool:
    """Whether ``flag`` (a bool tensor of any shape, on the host or the rank's device) is True
    anywhere on any rank. Every rank must call it: ranks decide together (e.g. to skip a
    step)."""
    value = flag.any()
    if not is_distributed():
        return bool(value)
    return bool(_all_reduced(value.to(torch.int32), dist.ReduceOp.MAX))


def max_over_ranks(value: int) -> int:
    """The largest of the ranks' ``value`` (``value`` itself outside DDP). Every rank must call
    it."""
    if not is_distributed():
        return value
    return int(_all_reduced(torch.tensor([value], dtype=torch.int64), dist.ReduceOp.MAX).item())


def gather_to_main(obj: object) -> list | None:
    """Every rank's picklable ``obj`` on rank 0, in rank order; None on the other ranks."""
    if not is_distributed():
        return [obj]
    gathered: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from ``src`` to every rank (identity outside DDP)."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


__all__ = [
    "all_reduce_mean",
    "all_reduce_sum",
    "any_rank",
    "broadcast_object",
    "gather_to_main",
    "is_distributed",
    "max_over_ranks",
    "rank",
]
