"""curvsafe.objectives (and the NLL helpers under it): parsing, values, gradients against autograd, ceilings."""

import pytest
import torch
from conftest import make_batch, rel_err, tiny_llama, with_lora

from curvsafe.anchors import keep_response_prefix
from curvsafe.nll import example_mean_nll, example_nlls, token_mean_nll
from curvsafe.objectives import LossTerm, Objective, parse_objective


def test_parse_objective_weights_and_errors():
    assert parse_objective("anchor+4*benign") == {"anchor": 1.0, "benign": 4.0}
    assert parse_objective({"harmful": 0.5}) == {"harmful": 0.5}
    for bad, match in (("anchor+x*benign", "WEIGHT"), ("anchor+nope", "among"), ("benign", "harmful prompts"),
                       ("0*anchor", "> 0")):
        with pytest.raises(ValueError, match=match):
            parse_objective(bad)


def test_token_and_example_means_are_two_weightings_of_the_same_nlls():
    model = tiny_llama()
    batches = [make_batch(seed=1), make_batch(batch=2, seq=5, seed=2, pad=False)]
    rows = example_nlls(model, batches)
    assert len(rows) == 5 and example_mean_nll(model, batches) == pytest.approx(sum(rows) / 5)
    counts = [int(((b["labels"][:, 1:] != -100) & (b["attention_mask"][:, 1:] != 0)).sum(1)[i])
              for b in batches for i in range(b["labels"].shape[0])]
    weighted = sum(r * c for r, c in zip(rows, counts)) / sum(counts)
    assert float(token_mean_nll(model, batches)) == pytest.approx(weighted, rel=1e-10)


def test_gradient_equals_autograd_of_the_value_and_a_ceiling_flattens_its_term():
    model = with_lora(tiny_llama())
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    safe, harm = [make_batch(seed=3)], [make_batch(seed=4)]
    objective = Objective([LossTerm("anchor", safe), LossTerm("harmful", harm, weight=0.5, sign=-1.0)])
    value, grad = objective.gradient(model, params)
    assert value == pytest.approx(objective.evaluate(model), rel=1e-10)
    assert value == pytest.approx(sum(objective.term_values(model).values()), rel=1e-10)
    model.eval()
    expected = token_mean_nll(model, safe, grad=True) - 0.5 * token_mean_nll(model, harm, grad=True)
    auto = torch.autograd.grad(expected, list(params.values()))
    for (n, g), a in zip(grad.items(), auto):
        assert rel_err(g, a) < 1e-10, n
    capped = Objective([LossTerm("anchor", safe),
                        LossTerm("harmful", harm, weight=0.5, sign=-1.0, ceiling=0.1)])  # the NLL is above 0.1
    value, grad = capped.gradient(model, params)
    assert capped.term_values(model)["harmful"] == pytest.approx(-0.05)
    anchor_only = Objective([LossTerm("anchor", safe)]).gradient(model, params)[1]
    for n in grad:
        assert rel_err(grad[n], anchor_only[n]) < 1e-12, n


def test_keep_response_prefix_counts_only_the_first_tokens():
    b = make_batch(batch=2, seq=8, pad=False, prompt=3)
    kept = keep_response_prefix([b], 2)[0]["labels"]
    assert ((kept != -100).sum(1) == 2).all()
    assert torch.equal(kept[:, 3:5], b["labels"][:, 3:5]) and (kept[:, 5:] == -100).all()
    assert keep_response_prefix([b], None)[0] is b
