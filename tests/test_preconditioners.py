"""Preconditioners (``restoration/preconditioners.py``): L-BFGS and CG against the Newton step, float64."""

import pytest
import torch

from curvsafe.curvature import GGNOperator
from curvsafe.curvature.vectors import flatten, unflatten
from curvsafe.restoration.preconditioners import make_preconditioner


@pytest.mark.parametrize("ggn_tokens", [None, 10 ** 6])
@pytest.mark.parametrize("method,tol", [("lbfgs", 1e-6), ("cg", 1e-6)])
def test_preconditioners_give_the_newton_step(setup, method, tol, ggn_tokens):
    """With as many pairs / iterations as parameters, CG and L-BFGS (conjugate pairs) apply (G + λI)^{-1} of the
    task loss's GGN G (the Newton step of its quadratic model), in float64, with their GGN products one pass per
    batch or over the batches merged (``ggn_tokens``). (Without re-conjugating each new direction, the CG
    recurrence's conjugacy decayed on products carrying LlamaRMSNorm's float32 noise and the L-BFGS step was off
    by 3e-3 to 8e-2.)"""
    from curvsafe.data import load_pairs, make_batches
    from curvsafe.models import load_model
    from curvsafe.restoration import trainable_params

    model, tok = load_model(setup / "aligned", setup / "adapter", dtype="float64", trainable_adapter=True)
    params = {n: p for n, p in trainable_params(model).items() if ".layers.0.self_attn.q_proj." in n}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    batches = make_batches(tok, load_pairs(setup / "task.jsonl")[:8], batch_size=3)
    names = list(params)
    dim = sum(p.numel() for p in params.values())
    ggn = GGNOperator(model, batches, names)
    shapes = {n: params[n].shape for n in names}
    G = torch.stack([flatten(ggn.mv(unflatten(e, shapes)), names) for e in torch.eye(dim, dtype=torch.float64)], 1)
    g = unflatten(G @ torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), shapes)
    # a well-conditioned system: the check is of the algebra
    pre = make_preconditioner(method, damping=1.0, ggn_tokens=ggn_tokens)
    if method == "lbfgs":
        pre.pairs = dim
    else:
        pre.maxiter, pre.tol = 4 * dim, 1e-12
    pre.refresh(model, batches, params, g)
    newton = torch.linalg.solve(G + pre.damping * torch.eye(dim, dtype=torch.float64), flatten(g, names))
    got = flatten(pre.apply(g), names)
    assert float((got - newton).norm() / newton.norm()) <= tol


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_curvature_seed_draws_the_monte_carlo_labels(setup, method):
    """``curvature_seed`` reaches the K-FAC / EK-FAC fit: the same seed gives the same curvature, another seed
    other sampled labels and so other factors (seen through their eigenvalues: the fit keeps only its bases)."""
    from curvsafe.data import load_pairs, make_batches
    from curvsafe.models import load_model
    from curvsafe.restoration import trainable_params

    model, tok = load_model(setup / "aligned", setup / "adapter", trainable_adapter=True)
    params = trainable_params(model)
    batches = make_batches(tok, load_pairs(setup / "task.jsonl")[:8], batch_size=8)
    g = {n: torch.ones_like(p) for n, p in params.items()}
    factors = []
    for seed in (0, 0, 1):
        pre = make_preconditioner(method, damping=0.1, seed=seed)
        pre.refresh(model, batches, params, g)
        assert pre.op.seed == seed
        factors.append(torch.cat([pre.op.eigen(b.name).lam_G for b in pre.op.blocks]))
    assert torch.equal(factors[0], factors[1]) and not torch.equal(factors[0], factors[2])


def test_a_dora_adapter_restores_with_exact_curvature_or_its_lora_weights_with_kfac():
    """DoRA's magnitude vectors are no linear block: kfac refuses the whole adapter naming what to do (lbfgs / cg,
    or the lora_A / lora_B weights alone), lbfgs and cg restore all of it, kfac the LoRA weights."""
    from conftest import make_batch, tiny_llama, with_lora

    from curvsafe.objectives import LossTerm, Objective
    from curvsafe.restoration.api import restore

    model = with_lora(tiny_llama(), dora=True)
    safety = Objective([LossTerm("refusal", [make_batch(seed=5)])])
    task = Objective([LossTerm("task", [make_batch(seed=6), make_batch(seed=7)])])
    with pytest.raises(ValueError, match=r"kfac covers linear blocks only.*lora_magnitude_vector.*'\*lora_A\*'"):
        restore(model, safety, task, method="kfac", iterations=1)
    for method, params in (("lbfgs", None), ("cg", None), ("kfac", ["*lora_A*", "*lora_B*"])):
        result = restore(model, safety, task, method=method, iterations=1, params=params)
        assert result.iterations == 1
        assert result.safety_objective["after"] < result.safety_objective["before"]
