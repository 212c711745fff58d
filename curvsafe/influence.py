"""Pairwise influence scores between query and training examples through the inverse curvature (what kronfluence's
``compute_pairwise_scores`` computes), on a fitted K-FAC or EK-FAC operator.

Convention: ``score[q, t] = g_q^T (C + damping I)^{-1} g_t``, with ``g_n`` the gradient of example ``n``'s summed
loss over its counted tokens (a batch row; -100 labels and padding do not count) w.r.t. the weights of the
operator's blocks, and ``C`` the operator (the curvature of the mean per-token loss, :mod:`curvsafe.curvature.kfac`;
``damping`` is on that scale). A positive score: a gradient step on training example ``t`` lowers query ``q``'s
loss. Per-example gradients come from the captured block inputs ``a_t`` and output gradients ``g_t`` of one
backward pass per batch (``sum_t g_t a_t^T`` per row, float32: one (d_out, d_in) matrix per example and block,
never one per token), in eval mode with the math attention. Biases are not scored.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .capture import LinearBlock
from .curvature._pass import BatchInfo, capture_pass, materialize
from .curvature.kfac import KFAC
from .curvature.loss import CausalLMLoss
from .curvature.sequence_grads import sequence_gradients


def per_example_gradients(model, blocks: Sequence[LinearBlock], batches: Sequence) -> dict[str, Tensor]:
    """Weight name -> (examples, d_out, d_in): each row's gradient of its summed token loss, in matrix form (see
    :mod:`curvsafe.capture`), in the order of the rows of ``batches``."""
    data = materialize(batches)
    out: dict[str, list[Tensor]] = {b.weight_name: [] for b in blocks}
    inputs: dict[str, Tensor] = {}
    info = BatchInfo()

    def on_forward(block: LinearBlock, a: Tensor) -> None:
        inputs[block.name] = a

    def on_backward(block: LinearBlock, g: Tensor) -> None:  # one gradient per row, zeros for an empty one
        out[block.weight_name].append(sequence_gradients(inputs.pop(block.name), g, info.segments))

    capture_pass(model, blocks, data, loss=CausalLMLoss(), fisher_type="empirical", generator=None,
                 on_forward=on_forward, on_backward=on_backward, info=info,
                 desc="per-example gradients", progress=False, verify=False)
    return {n: torch.cat(parts) for n, parts in out.items()}


def pairwise_scores(operator: KFAC, query_batches: Sequence, train_batches: Sequence, *,
                    damping: float) -> Tensor:
    """(queries, training examples) scores ``g_q^T (C + damping I)^{-1} g_t`` (module docstring); ``operator`` a
    fitted :class:`~curvsafe.curvature.KFAC` or :class:`~curvsafe.curvature.EKFAC` of the model."""
    blocks = operator.blocks
    queries = per_example_gradients(operator.model, blocks, query_batches)
    train = per_example_gradients(operator.model, blocks, train_batches)
    device = next(iter(queries.values())).device
    rows = []
    for q in range(next(iter(queries.values())).shape[0]):
        v = {n: torch.zeros(shape, device=device) for n, shape in operator.param_shapes.items()}
        for b in blocks:
            v[b.weight_name] = b.from_matrix(queries[b.weight_name][q])
        pre = operator.inverse_mv(v, damping)
        rows.append(sum(torch.einsum("noi,oi->n", train[b.weight_name], b.as_matrix(pre[b.weight_name]).float())
                        for b in blocks))
    return torch.stack(rows)
