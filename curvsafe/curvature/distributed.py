"""All-reduce helpers: under ``torch.distributed`` statistics are summed over ranks (sums and counts, never an
average of averages), so every rank ends with the statistics of the union of the data. No-ops otherwise."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(tensors: Iterable[Tensor]) -> None:
    """Sum each tensor over ranks in place."""
    if not is_distributed():
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_reduce_counts(counts: list[float], device: torch.device) -> list[float]:
    """Sum a list of scalars over ranks."""
    if not is_distributed():
        return counts
    t = torch.tensor(counts, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()
