"""Per-parameter (diagonal) curvature.

- :func:`empirical_fisher_diagonal`: the exact diagonal of the empirical Fisher of :mod:`.hvp` (sequences are
  examples, ``(1/K) sum_k (1/N_k) sum_{n in k} g_n * g_n``) for the weights and biases of the captured linear
  blocks, from per-example gradients that are never materialised (:func:`~curvsafe.kernels.linear_fisher_diag`).
- :func:`hutchinson_hessian_diagonal`: the unbiased Hutchinson estimate ``E[z * (H z)]`` (Rademacher ``z``) of
  the diagonal of the Hessian of the mean loss, for any parameters.
- :class:`DiagonalOperator`: either as an operator (``mv = d * v``, ``inverse_mv = v / (d + damping)``).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from ..capture import LinearBlock, ModuleSelection, find_blocks
from ..kernels import linear_fisher_diag
from ._pass import BatchInfo, capture_pass, materialize
from .base import CurvatureOperator
from .distributed import all_reduce_counts, all_reduce_sum_
from .hvp import ParamSelection, hvp, select_params
from .loss import CausalLMLoss, model_device
from .sequence_grads import sequence_sums
from .vectors import ParamVector


class DiagonalOperator(CurvatureOperator):
    """A diagonal curvature ``diag(d)`` over the parameters named in ``diagonal``."""

    def __init__(self, diagonal: Mapping[str, Tensor]):
        self.diagonal = {n: t.detach() for n, t in diagonal.items()}
        self.param_shapes = {n: t.shape for n, t in self.diagonal.items()}

    def _mv(self, v: ParamVector) -> ParamVector:
        return {n: self.diagonal[n].to(v[n].dtype) * v[n] for n in self.param_shapes}

    def _inverse_mv(self, v: ParamVector, damping: float) -> ParamVector:
        return {n: v[n] / (self.diagonal[n].to(v[n].dtype) + damping) for n in self.param_shapes}


def empirical_fisher_diagonal(model: nn.Module, batches: Iterable, modules: ModuleSelection = None, *,
                              loss=None, progress: Optional[bool] = None) -> ParamVector:
    """Exact empirical-Fisher diagonal of the captured blocks' weights and biases (module docstring)."""
    blocks = find_blocks(model, modules)
    data = materialize(batches)
    info = BatchInfo()
    inputs: dict[str, Tensor] = {}
    batch_parts: dict[str, Tensor] = {}
    totals: dict[str, Tensor] = {}

    def on_forward(block: LinearBlock, a: Tensor) -> None:
        inputs[block.name] = a

    def on_backward(block: LinearBlock, g: Tensor) -> None:
        w = linear_fisher_diag(inputs.pop(block.name), g, offsets=info.segments.offsets)
        batch_parts[block.weight_name] = block.from_matrix(w)
        if block.bias_name:
            batch_parts[block.bias_name] = sequence_sums(g, info.segments).square().sum(0)

    def on_batch_end() -> None:
        # g is the gradient of the batch's sum loss; the EF of its mean loss carries 1 / N_k
        n = info.num_loss_tokens.clamp_min(1)
        for name, part in batch_parts.items():
            totals[name] = part / n if name not in totals else totals[name].add_(part / n)
        batch_parts.clear()

    capture_pass(model, blocks, data, loss=loss or CausalLMLoss(), fisher_type="empirical", generator=None,
                 on_forward=on_forward, on_backward=on_backward, info=info, on_batch_end=on_batch_end,
                 desc="Fisher diagonal", progress=progress, verify=False)
    all_reduce_sum_(totals.values())
    (k,) = all_reduce_counts([float(len(data))], model_device(model))
    return {name: t / k for name, t in totals.items()}


def hutchinson_hessian_diagonal(model: nn.Module, batches: Iterable, params: ParamSelection = None, *,
                                num_samples: int = 32, seed: int = 0, loss=None) -> ParamVector:
    """Hutchinson estimate of the Hessian diagonal of the mean loss: the mean of ``z * hvp(z)`` over
    ``num_samples`` Rademacher vectors drawn from a generator seeded with ``seed``."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    data = materialize(batches)
    chosen = select_params(model, params)
    gen = torch.Generator().manual_seed(seed)
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in chosen.items()}
    for _ in range(num_samples):
        z = {n: (torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for n, p in chosen.items()}
        hz = hvp(model, data, z, list(chosen), loss=loss)
        for n in chosen:
            total[n] += (z[n] * hz[n]).double()
    return {n: (t / num_samples).to(chosen[n].dtype) for n, t in total.items()}
