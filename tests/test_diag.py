"""Diagonal curvature: exact empirical-Fisher diagonal and the Hutchinson Hessian diagonal."""

import pytest
import torch
from conftest import TinyMLPLM, make_batch, rel_err, tiny_gpt2, tiny_llama, with_lora
from test_hvp import dense_hessian

from curvsafe.curvature import (DiagonalOperator, empirical_fisher_diagonal, empirical_fisher_vp,
                                hutchinson_hessian_diagonal, select_params)


def dense_diagonal(product, params):
    """diag(C) column by column from an exact product."""
    out = {}
    for name, p in params.items():
        d = torch.zeros(p.numel(), dtype=torch.float64)
        for i in range(p.numel()):
            e = {n: torch.zeros_like(q) for n, q in params.items()}
            e[name].view(-1)[i] = 1.0
            d[i] = product(e)[name].reshape(-1)[i]
        out[name] = d.view(p.shape)
    return out


@pytest.mark.parametrize("make_model", [lambda: with_lora(tiny_llama()), lambda: tiny_gpt2(tie=False)])
def test_empirical_fisher_diagonal_is_exact(make_model):
    model = make_model()
    batches = [make_batch(seed=1), make_batch(seed=2, batch=2, pad=False)]
    modules = (["*.layers.1.self_attn.v_proj.lora_*"] if hasattr(model, "peft_config")
               else ["transformer.h.1.attn.c_proj"])
    diag = empirical_fisher_diagonal(model, batches, modules)
    params = {n: p for n, p in model.named_parameters() if n in diag}
    assert set(diag) == set(params) and params  # Conv1D bias included for GPT-2
    expected = dense_diagonal(lambda e: empirical_fisher_vp(model, batches, e, list(params)), params)
    for n in diag:
        assert rel_err(diag[n], expected[n]) <= 1e-5


def test_hutchinson_is_unbiased():
    torch.manual_seed(0)
    model = TinyMLPLM().double()
    batches = [make_batch()]
    params = select_params(model)
    H = dense_hessian(model, batches, params)
    exact = torch.diagonal(H)
    samples = 200
    est = hutchinson_hessian_diagonal(model, batches, num_samples=samples, seed=0)
    err = rel_err(torch.cat([est[n].reshape(-1) for n in params]), exact)
    # Var[z_i (Hz)_i] = sum_{j != i} H_ij^2 for Rademacher z: the expected relative error of the mean
    off = (H - torch.diag(exact)).square().sum()
    expected = float((off / samples).sqrt() / exact.norm())
    assert err < 2.0 * expected
    again = hutchinson_hessian_diagonal(model, batches, num_samples=3, seed=5)
    assert all(torch.equal(again[n], hutchinson_hessian_diagonal(model, batches, num_samples=3, seed=5)[n])
               for n in again)


def test_diagonal_operator():
    d = {"w": torch.tensor([1.0, 2.0, 4.0])}
    op = DiagonalOperator(d)
    v = {"w": torch.tensor([1.0, 1.0, 1.0])}
    assert torch.equal(op.mv(v)["w"], torch.tensor([1.0, 2.0, 4.0]))
    assert torch.allclose(op.inverse_mv(v, 1.0)["w"], torch.tensor([0.5, 1 / 3, 0.2]))
    with pytest.raises(ValueError):
        op.mv({"w": torch.ones(2)})


def test_block_fisher_equals_the_exact_fisher_blocks():
    """Each block of the operator built on the fused linear_fisher_vp op equals the exact empirical Fisher
    (JVP + VJP) applied to a vector that is zero outside that block."""
    from curvsafe.curvature import BlockFisherOperator

    model = with_lora(tiny_llama())
    batches = [make_batch(seed=1), make_batch(seed=2, batch=2, pad=False)]
    op = BlockFisherOperator(model, batches)
    params = {n: p for n, p in model.named_parameters() if n in op.param_shapes}
    g = torch.Generator().manual_seed(0)
    v = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()}
    got = op.mv(v)
    for name in list(v)[:4]:
        only = {n: (t if n == name else torch.zeros_like(t)) for n, t in v.items()}
        exact = empirical_fisher_vp(model, batches, only, list(params))[name]
        assert rel_err(got[name], exact) <= 1e-5
    x = op.inverse_mv(v, damping=0.1)
    back = op.mv(x)
    assert all(rel_err(back[n] + 0.1 * x[n], v[n]) <= 1e-5 for n in v)
