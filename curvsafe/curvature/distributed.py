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


BUCKET_BYTES = 64 << 20  # the most one flattened all-reduce carries (as DDP's gradient buckets, larger)


def all_reduce_sum_(tensors: Iterable[Tensor]) -> None:
    """Sum each tensor over ranks in place: tensors of one dtype and device go flattened into buckets of up to
    :data:`BUCKET_BYTES` (one collective per bucket, not per tensor; a larger tensor goes alone, unflattened),
    the same element-wise sums."""
    if not is_distributed():
        return
    buckets: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        if t.numel() * t.element_size() >= BUCKET_BYTES:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            continue
        key = (t.dtype, t.device)
        bucket = buckets.setdefault(key, [])
        if bucket and (sum(x.numel() for x in bucket) + t.numel()) * t.element_size() > BUCKET_BYTES:
            _all_reduce_flat(bucket)
            bucket.clear()
        bucket.append(t)
    for bucket in buckets.values():
        if bucket:
            _all_reduce_flat(bucket)


def _all_reduce_flat(tensors: list[Tensor]) -> None:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()


def all_reduce_counts(counts: list[float], device: torch.device) -> list[float]:
    """Sum a list of scalars over ranks."""
    if not is_distributed():
        return counts
    t = torch.tensor(counts, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()
