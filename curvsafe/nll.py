"""Negative log-likelihood of the counted response tokens of HF batches: one helper per reduction.

The loss is :class:`~curvsafe.curvature.loss.CausalLMLoss` (HF's shift by one, -100 ignored, padding never
counted). ``token_mean_nll`` weights every counted token alike (the objectives' and the task's convention);
``example_mean_nll`` weights every example (row) alike (the loss landscapes of :mod:`curvsafe.analyze`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .curvature.distributed import all_reduce_counts, is_distributed
from .curvature.loss import CausalLMLoss, call_model, counted_token_losses, curvature_mode, prepare_batch


def batch_nll_sums(model, batches: Sequence, *, grad: bool, per_example: bool = False):
    """Yield (sum of token NLLs [per example when ``per_example``], counted tokens) for each batch."""
    loss = CausalLMLoss()
    device = next(model.parameters()).device
    for raw in batches:
        b = prepare_batch(raw, device)
        with torch.set_grad_enabled(grad):
            out = call_model(model, b)
            targets = loss.targets(b)
            valid = loss.valid(targets) & b["attention_mask"].bool()
            token = counted_token_losses(loss, out, targets, valid)
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
