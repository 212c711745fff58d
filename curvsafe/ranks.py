"""Data-parallel runs of a command over ``torch.distributed`` ranks (``torchrun``, ``accelerate launch``).

Conventions: every rank holds the whole model and the same input files; work is split by interleaving
(``items[rank::world]``: rank r takes items r, r + W, r + 2W, ...), and results that every rank needs are gathered
back in the input's order. Statistics are all-reduced as sums and counts (:mod:`curvsafe.curvature.distributed`),
so every rank computes the same numbers and takes the same decisions. Nothing assumes one node: the process
group comes from the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), rank 0 checks and writes the output (on its own filesystem), and a failure on any rank is
raised on every rank (:func:`together`), so that no rank waits in a collective for one that gave up.
Without an initialised process group of more than one rank everything here is the single-process identity.
"""

from __future__ import annotations

import builtins
import gc
import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from .curvature.distributed import is_distributed

T = TypeVar("T")


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process is rank 0: the one that logs, shows progress and writes outputs."""
    return rank() == 0


def launched() -> bool:
    """Whether a launcher started this process as one of several ranks (``WORLD_SIZE`` > 1 in the
    environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str, timeout_s: float = 1800.0) -> str:
    """Join the process group of a launcher (``torchrun`` / ``accelerate launch``) when one started this process
    and no group exists yet: NCCL on CUDA, gloo on CPU. Returns the device of this rank: ``cuda:LOCAL_RANK``
    for a bare ``cuda`` device, else ``device`` unchanged."""
    if not launched():
        return device
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return str(dev)


def leave_group() -> None:
    """Leave the process group together: a barrier, then ``destroy_process_group`` (a rank still shutting down
    may need the store that rank 0 hosts; a rank that is gone already skips the barrier). Free what holds the
    group first (an FSDP2-sharded model, a DDP wrapper): the group is then torn down here, while every rank is
    still alive, not at the interpreter's exit (where gloo, after a peer has gone, has aborted the process:
    "terminate called without an active exception")."""
    if not dist.is_initialized():
        return
    gc.collect()  # reference cycles of freed models (FSDP2 hooks) that still hold the group
    try:
        dist.barrier()
    except RuntimeError:
        pass
    dist.destroy_process_group()


def shard(items: Sequence[T], what: str, equal: bool = False) -> list[T]:
    """This rank's items: ``items[rank::world]``. Every rank needs at least one (``what`` names the items in the
    error, which every rank raises alike since they all hold the same ``items``). ``equal``: the items are
    batches (dicts of tensors with rows) and every rank must get as many (an FSDP2-sharded model runs a collective
    in every forward): the batches with the most rows are first split in two (:func:`balance`)."""
    size = world_size()
    if len(items) < size:
        raise ValueError(f"{what}: {len(items)} for {size} ranks; every rank needs at least one (add data, lower "
                         "--batch-size, or use fewer ranks)")
    if equal:
        items = balance(items, size)
    return list(items[rank()::size])


def balance(batches: Sequence[dict], ranks: int) -> list[dict]:
    """``batches`` with their number raised to a multiple of ``ranks`` by splitting, one at a time, the batch with
    the most rows into its first and second halves of rows (in place in the order: the data's order is kept).
    Token sums and counts over all batches, hence every token-mean loss and its gradient, are unchanged; a row's
    padding columns stay masked; a curvature averaged per batch (the GGN / Hessian products' convention) counts
    the two halves as two batches. Raises when there are too few rows to split."""
    out = list(batches)
    while len(out) % ranks:
        index = max(range(len(out)), key=lambda i: (len(out[i]["input_ids"]), -i))
        rows = len(out[index]["input_ids"])
        if rows < 2:
            raise ValueError(f"{sum(len(b['input_ids']) for b in batches)} examples cannot make a multiple of "
                             f"{ranks} batches (one per rank, equally many); add data or use fewer ranks")
        half = (rows + 1) // 2
        out[index:index + 1] = [{k: v[:half] for k, v in out[index].items()},
                                {k: v[half:] for k, v in out[index].items()}]
    return out


def gather_objects(local: T) -> list[T]:
    """Every rank's ``local`` (picklable), in rank order, on every rank."""
    if not is_distributed():
        return [local]
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, local)
    return parts


def map_sharded(fn: Callable[[list], list], items: Sequence) -> list:
    """``fn(items)`` computed in shards: each rank applies ``fn`` (one result per item) to its
    :func:`shard`, and every rank gets all the results in the order of ``items``. With fewer items than ranks
    the idle ranks apply ``fn`` to an empty list (``fn`` may run collectives, e.g. FSDP2's all-gathers: every
    rank calls it)."""
    size = world_size()
    mine = list(items[rank()::size])
    results = fn(mine)
    if len(results) != len(mine):
        raise ValueError(f"expected one result per item, got {len(results)} for {len(mine)}")
    parts = gather_objects(results)
    out = [None] * len(items)
    for r, part in enumerate(parts):
        out[r::size] = part
    return out


@contextmanager
def together() -> Iterator[None]:
    """Run the block on every rank, then raise on every rank the first failure of any (as its nearest built-in
    exception type, e.g. ``ValueError`` for a subclass of it; the message names the failing rank), so
    a bad input or a missing file on one node fails the whole run the same way instead of leaving the other
    ranks in a collective. The block itself must not run collectives (a rank that failed before one would leave
    the others waiting in it). Interrupts (KeyboardInterrupt, SIGTERM) are not caught."""
    if not is_distributed():
        yield
        return
    failure = None
    try:
        yield
    except Exception as exc:
        failure = exc
    reports = gather_objects(None if failure is None else
                             ([c.__name__ for c in type(failure).__mro__], str(failure)))
    failed = [(r, report) for r, report in enumerate(reports) if report is not None]
    if not failed:
        return
    if failure is not None and len(failed) == world_size() and len({m for _, (_, m) in failed}) == 1:
        raise failure  # every rank failed alike: its own exception, traceback included
    first_rank, (kinds, message) = failed[0]
    cls = next((c for c in (getattr(builtins, k, None) for k in kinds)
                if isinstance(c, type) and issubclass(c, Exception)), RuntimeError)
    raise cls(f"rank {first_rank} of {world_size()}: {kinds[0]}: {message}") from failure
