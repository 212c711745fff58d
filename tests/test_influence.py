"""Pairwise influence scores against per-example autograd gradients and the operator's own inverse."""

import pytest
import torch
from conftest import make_batch, rel_err, tiny_llama, with_lora

from curvsafe.curvature import EKFAC, KFAC
from curvsafe.curvature.loss import curvature_mode
from curvsafe.influence import pairwise_scores, per_example_gradients
from curvsafe.nll import batch_nll_sums


def autograd_gradients(model, blocks, batches):
    """Each row's gradient of its summed token loss, one autograd call per row (the oracle)."""
    weights = [b.module.weight for b in blocks]
    out = []
    with curvature_mode(model):
        for batch in batches:
            sums, _ = next(batch_nll_sums(model, [batch], grad=True, per_example=True))
            for row in range(sums.shape[0]):
                grads = torch.autograd.grad(sums[row], weights, retain_graph=True, allow_unused=True)
                out.append({b.weight_name: (g if g is not None else torch.zeros_like(w))
                            for b, g, w in zip(blocks, grads, weights)})
    return out


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_pairwise_scores_equal_the_inverse_curvature_between_autograd_gradients(cls):
    model = with_lora(tiny_llama())
    query = [make_batch(batch=2, seq=6, seed=10, prompt=3)]
    train = [make_batch(batch=3, seq=7, seed=s) for s in (20, 21)]  # the second row of each is padded
    op = cls(model).fit(train)
    damping = 0.3
    scores = pairwise_scores(op, query, train, damping=damping)
    assert scores.shape == (2, 6)
    q_grads, t_grads = autograd_gradients(model, op.blocks, query), autograd_gradients(model, op.blocks, train)
    grads = per_example_gradients(model, op.blocks, train)
    for b in op.blocks:
        expected = torch.stack([g[b.weight_name] for g in t_grads])
        assert rel_err(torch.stack([b.from_matrix(m) for m in grads[b.weight_name]]).double(), expected) < 1e-5
    for q, gq in enumerate(q_grads):
        v = {n: torch.zeros(s, dtype=torch.float64) for n, s in op.param_shapes.items()}
        v.update(gq)
        pre = op.inverse_mv(v, damping)
        expected = torch.tensor([sum(float((pre[n] * g[n]).sum()) for n in g) for g in t_grads])
        assert rel_err(scores[q].double(), expected) < 1e-5, q
