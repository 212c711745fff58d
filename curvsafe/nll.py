"""Negative log-likelihood of the counted response tokens of HF batches: one helper per reduction.

The loss is :class:`~curvsafe.curvature.loss.CausalLMLoss` (HF's shift by one, -100 ignored, padding never
counted). ``token_mean_nll`` weights every counted token alike (the objectives' and the task's convention);
``example_mean_nll`` weights every example (row) alike (the loss landscapes of :mod:`curvsafe.analyze`).
"""

from __future__ import annotations

from typing import Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .curvature.distributed import all_reduce_counts, is_distributed
from .curvature.loss import (CausalLMLoss, call_model, concat_batches, counted_token_losses, curvature_mode, merged,
                             prepare_batch)
from .curvature.sharded import is_sharded


def counted(batch: Mapping[str, Tensor]) -> Tensor:
    """(B, T) the positions whose loss counts (the target, the next label, not ignored; the position not padding)."""
    loss = CausalLMLoss()
    return loss.valid(loss.targets(batch)) & batch["attention_mask"].bool()


def check_merge(model, max_tokens: Optional[int]) -> None:
    """Check ``max_tokens`` (None or >= 1), and refuse merged batches on an FSDP2-sharded model: ranks whose
    batches have other shapes would run other numbers of forwards, and every forward there is a collective."""
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    if max_tokens is not None and any(is_sharded(p) for p in model.parameters()):
        raise ValueError("merged batches (max_tokens) do not run on an FSDP2-sharded model: ranks whose batches have "
                         "other shapes would run other numbers of forwards; pass max_tokens=None")


def batch_nll_sums(model, batches: Sequence, *, grad: bool, per_example: bool = False,
                   max_tokens: Optional[int] = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (sum of token NLLs [per example when ``per_example``], counted tokens [per example]) for each batch;
    with ``max_tokens``, for each pass of consecutive batches merged into one forward of at most that many tokens
    (rows x longest length, rows right-padded: :func:`~.curvature.loss.merged`): the same sums from fewer, larger
    forwards (up to float rounding), the examples in their order. Not on an FSDP2-sharded model
    (:func:`check_merge`)."""
    check_merge(model, max_tokens)
    loss = CausalLMLoss()
    device = next(model.parameters()).device
    prepared = (prepare_batch(raw, device) for raw in batches)
    for group in merged(prepared, lambda b: tuple(b["input_ids"].shape[:2]), max_tokens):
        b = concat_batches(group)
        with torch.set_grad_enabled(grad):
            out = call_model(model, b)
            valid = counted(b)
            token = counted_token_losses(loss, out, loss.targets(b), valid)
            yield (token.sum(1) if per_example else token.sum()), valid.sum(1 if per_example else None)


def token_mean_nll(model, batches: Sequence, *, grad: bool = False, across_ranks: bool = False) -> Tensor:
    """Token-weighted mean NLL over ``batches`` (differentiable when ``grad``). ``across_ranks``: under
    ``torch.distributed``, over the union of every rank's batches (sums and counts all-reduced; no gradient)."""
    if grad and across_ranks:
        raise ValueError("across_ranks reduces values only; it cannot carry a gradient")
    total, count = 0.0, 0
    for s, n in batch_nll_sums(model, batches, grad=grad):
        total, count = total + s, count + int(n)
    if across_ranks and is_distributed():  # float64 sums of the ranks' sums
        total, count = all_reduce_counts([float(total), count], next(model.parameters()).device)
        total = torch.tensor(total, dtype=torch.float64)
    if count == 0:
        raise ValueError("no counted tokens in the data")
    return total / count


def example_nlls(model, batches: Sequence) -> list[float]:
    """Mean response NLL of every example (row) of the batches (eval mode, math attention)."""
    out = []
    with curvature_mode(model):
        for sums, counts in batch_nll_sums(model, batches, grad=False, per_example=True):
            out += (sums / counts.clamp_min(1)).tolist()
    return out


def example_mean_nll(model, batches: Sequence) -> float:
    """The mean over examples of :func:`example_nlls`."""
    values = example_nlls(model, batches)
    return sum(values) / len(values)
