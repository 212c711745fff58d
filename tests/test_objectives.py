"""curvsafe.objectives (and the NLL helpers under it): parsing, values, gradients against autograd, ceilings."""

import pytest
import torch
from conftest import make_batch, rel_err, tiny_llama, with_lora

from curvsafe.anchors import keep_response_prefix
from curvsafe.nll import example_mean_nll, example_nlls, token_mean_nll
from curvsafe.objectives import LossTerm, Objective, objective_gradients, objective_values, parse_objective


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


def _restore_objectives():
    """Restore's three objectives on the tiny LoRA Llama: the task (batches of other lengths, a row with nothing
    counted), S = anchor + 4 * benign, and the benign constraint on the same list of benign batches."""
    task = [make_batch(batch=3, seq=7, seed=1), make_batch(batch=1, seq=5, seed=2),
            make_batch(batch=4, seq=9, seed=4, prompt=6)]
    task[0]["labels"][0] = -100
    anchor, benign = [make_batch(seed=5), make_batch(batch=2, seq=6, seed=6)], [make_batch(seed=7)]
    return [Objective([LossTerm("task", task)]),
            Objective([LossTerm("anchor", anchor), LossTerm("benign", benign, weight=4.0)]),
            Objective([LossTerm("benign", benign)])]


def test_objectives_together_evaluate_shared_data_once_and_merge_batches():
    """``objective_values`` / ``objective_gradients``: each objective's own values and gradients, the benign data
    that S and the constraint share evaluated once, and with ``max_tokens`` each term's batches merged into
    right-padded passes (the same values and gradients, up to HF's float32 RMSNorm)."""
    model = with_lora(tiny_llama())
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    objectives = _restore_objectives()
    alone = [(o.term_values(model), o.gradient(model, params)) for o in objectives]
    forwards = []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: forwards.append(tuple(kwargs["input_ids"].shape)),
                                       with_kwargs=True)
    try:
        for max_tokens, shapes, tol in ((None, [(3, 7), (1, 5), (4, 9), (3, 7), (2, 6), (3, 7)], 1e-12),
                                        (35, [(4, 7), (4, 9), (5, 7), (3, 7)], 1e-6),
                                        (10 ** 6, [(8, 9), (5, 7), (3, 7)], 1e-6)):
            forwards.clear()
            values = objective_values(model, objectives, max_tokens=max_tokens)
            assert forwards == shapes, max_tokens  # the benign batch once, not once per objective
            forwards.clear()
            together = objective_gradients(model, params, objectives, max_tokens=max_tokens)
            assert forwards == shapes, max_tokens
            for (want_terms, (want_value, want_grad)), got_terms, (got_value, got_grad) in zip(alone, values,
                                                                                                together):
                assert got_terms.keys() == want_terms.keys()
                for name in want_terms:
                    assert got_terms[name] == pytest.approx(want_terms[name], rel=tol), (max_tokens, name)
                assert got_value == pytest.approx(want_value, rel=tol)
                for n in want_grad:
                    assert rel_err(got_grad[n], want_grad[n]) < tol, (max_tokens, n)
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="max_tokens"):
        objective_values(model, objectives, max_tokens=0)


def test_a_gradient_holds_one_pass_of_activations_at_a_time():
    """Each pass is differentiated before the next forward: the tensors autograd saved for the backward of one pass
    are all freed before the next pass's forward starts, however many batches a term has (a gradient's memory is a
    training step's, as the plan prices it)."""
    import weakref

    model = with_lora(tiny_llama())
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    class Saved:
        __slots__ = ("tensor", "__weakref__")

        def __init__(self, tensor):
            self.tensor = tensor

    alive, at_forward = weakref.WeakSet(), []

    def pack(t):
        held = Saved(t)
        alive.add(held)
        return held

    hook = model.register_forward_pre_hook(lambda *_: at_forward.append(len(alive)))
    try:
        for max_tokens in (None, 35):
            at_forward.clear()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda held: held.tensor):
                objective_gradients(model, params, _restore_objectives(), max_tokens=max_tokens)
            assert len(at_forward) >= 4 and at_forward == [0] * len(at_forward), (max_tokens, at_forward)
    finally:
        hook.remove()


def test_a_non_finite_loss_is_a_value_to_reject_and_a_gradient_to_refuse():
    """A trial step that blows the model up evaluates to NaN (restore's backtracking rejects it and halves the
    step), while a gradient there is refused with the term's name."""
    model = with_lora(tiny_llama())
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    objectives = _restore_objectives()
    with torch.no_grad():
        next(iter(params.values())).fill_(float("inf"))
    values = objective_values(model, objectives)
    assert all(v != v for terms in values for v in terms.values())  # NaN
    with pytest.raises(FloatingPointError, match="task loss is not finite"):
        objective_gradients(model, params, objectives)


def test_keep_response_prefix_counts_only_the_first_tokens():
    b = make_batch(batch=2, seq=8, pad=False, prompt=3)
    kept = keep_response_prefix([b], 2)[0]["labels"]
    assert ((kept != -100).sum(1) == 2).all()
    assert torch.equal(kept[:, 3:5], b["labels"][:, 3:5]) and (kept[:, 5:] == -100).all()
    assert keep_response_prefix([b], None)[0] is b
