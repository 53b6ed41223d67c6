"""Agreement across ranks: sums, maxima and flags that every rank must see alike.

Each is one all-reduce when the world has more than one rank, and free otherwise; every rank must
call it at the same point (it is a collective).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def all_sum(values: list[float], device, world: int) -> list[float]:
    """`values` summed over the ranks, in float64."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_max(count: int, device, world: int) -> int:
    """The largest `count` of any rank."""
    if world == 1:
        return count
    t = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool, device, world: int) -> bool:
    """True on every rank when `flag` is true on any."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
