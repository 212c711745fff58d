"""Example screening (curvsafe.optim.screen): per-example gradients against autograd's per-row ones, the screened
gradient against the gradient of the kept rows, its scale, accumulation, mismatch and CurvSafe's use of it."""

import gc

import pytest
import torch
from conftest import make_batch, rel_err, tiny_gpt2, tiny_llama, with_lora

from curvsafe.capture import find_blocks
from curvsafe.optim import CurvSafe
from curvsafe.optim.screen import ExampleScreen


def models():
    gpt2 = tiny_gpt2(tie=True)
    for m in gpt2.modules():  # training-mode forwards (the ones screened) must repeat exactly
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return {"lora-llama": with_lora(tiny_llama()), "gpt2-conv1d-biases": gpt2}


def protected(model):
    """The parameters of the blocks a screen on ``find_blocks(model)`` covers, by name."""
    named = dict(model.named_parameters())
    return {n: named[n] for b in find_blocks(model) for n in b.param_names}


def row_losses(model, batch):
    """Each row's share of the batch loss (token-mean over the whole batch, as HF's, but in the model's float64:
    HF's own loss is computed in float32)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none")
    return (nll * (labels != -100)).sum(1) / (labels != -100).sum()


def row_gradients(model, batch, params):
    """Autograd's gradient of each row's share of the batch loss."""
    per_row = row_losses(model, batch)
    return [dict(zip(params, torch.autograd.grad(per_row[i], list(params.values()), retain_graph=True)))
            for i in range(per_row.shape[0])]


def backward(model, batch):
    row_losses(model, batch).sum().backward()


@pytest.mark.parametrize("name", ["lora-llama", "gpt2-conv1d-biases"])
def test_a_screened_row_leaves_exactly_its_own_gradient(name):
    """With the safety gradient minus one row's gradient, that row (cosine 1) and only it is screened; the gradient
    left is the sum of the other rows' own gradients (autograd per row), biases and Conv1D layouts included."""
    model = models()[name]
    model.train()
    params = protected(model)
    batch = make_batch(batch=3, seq=7, seed=1)
    rows = row_gradients(model, batch, params)
    screen = ExampleScreen(model, find_blocks(model), threshold=0.999)
    backward(model, batch)
    total = {n: p.grad.clone() for n, p in params.items()}
    assert all(rel_err(total[n], sum(r[n] for r in rows)) < 1e-10 for n in params)  # the rows sum to the batch
    assert screen.pending == 3
    screened = screen.apply(params, {n: -rows[0][n] for n in params})
    assert screened == (1, 3) and not screen.mismatch and screen.pending == 0
    assert abs(float(screen.cosines[0]) - 1) < 1e-12 and screen.cosines.shape == (3,)
    for n, p in params.items():
        assert rel_err(p.grad, rows[1][n] + rows[2][n]) < 1e-10, n


def test_screening_keeps_the_scale_of_a_clipped_gradient_and_covers_every_micro_batch():
    """Two micro-batches accumulate, the gradient is scaled (as clipping or AMP's unscaling do): the screened row's
    gradient leaves at that scale, the other five rows' stay."""
    model = models()["lora-llama"]
    model.train()
    params = protected(model)
    batches = [make_batch(batch=3, seq=7, seed=s) for s in (1, 2)]
    rows = [r for b in batches for r in row_gradients(model, b, params)]
    screen = ExampleScreen(model, find_blocks(model), threshold=0.999)
    for b in batches:
        backward(model, b)
    for p in params.values():
        p.grad.mul_(0.3)
    assert screen.apply(params, {n: -rows[4][n] for n in params}) == (1, 6)
    for n, p in params.items():
        assert rel_err(p.grad, 0.3 * sum(r[n] for i, r in enumerate(rows) if i != 4)) < 1e-10, n


def test_examples_that_do_not_add_up_to_the_gradient_are_not_screened():
    """A gradient zeroed behind the screen's back (a skipped step, then the model's zero_grad) leaves stale
    examples: nothing is screened and the gradient is left as it is."""
    model = models()["lora-llama"]
    model.train()
    params = protected(model)
    rows = row_gradients(model, make_batch(seed=2), params)
    screen = ExampleScreen(model, find_blocks(model), threshold=0.0)
    backward(model, make_batch(seed=1))
    model.zero_grad()
    backward(model, make_batch(seed=2))
    before = {n: p.grad.clone() for n, p in params.items()}
    assert screen.apply(params, {n: -rows[0][n] for n in params}) == (0, 6) and screen.mismatch
    assert all(torch.equal(p.grad, before[n]) for n, p in params.items())
    screen.clear()
    assert screen.pending == 0


def test_eval_mode_and_no_grad_forwards_are_not_captured_and_a_dropped_screen_unhooks():
    model = models()["lora-llama"]
    screen = ExampleScreen(model, find_blocks(model), threshold=0.0)
    model.eval()
    backward(model, make_batch(seed=1))
    model.train()
    with torch.no_grad():
        model(**make_batch(seed=1))
    assert screen.pending == 0
    block = find_blocks(model)[0]
    hooks = len(block.module._forward_hooks)
    del screen
    gc.collect()
    assert len(block.module._forward_hooks) == hooks - 1


def train(model, opt, batches):
    model.train()
    for b in batches:
        opt.zero_grad()
        backward(model, b)
        opt.step()


def lora_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_curvsafe_screens_reports_and_screens_nothing_bit_for_bit_above_every_cosine():
    safety = [make_batch(batch=4, seq=6, seed=100 + s, prompt=4) for s in range(2)]
    data = [make_batch(batch=3, seq=8, seed=s) for s in range(4)]

    def run(**settings):
        model = with_lora(tiny_llama())
        opt = CurvSafe(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2), model,
                       safety, **settings)
        reports = []
        for b in data:
            train(model, opt, [b])
            reports.append(opt.report.as_dict())
        return lora_params(model), reports, opt.constraint.summary()

    plain, _, plain_summary = run()
    high, high_reports, _ = run(screen=0.9999)
    assert all(torch.equal(plain[n], high[n]) for n in plain)  # three rows never point along one gradient
    assert [r["screened"] for r in high_reports] == [[0, 3]] * 4 and "screened" not in plain_summary
    low, low_reports, summary = run(screen=0.0)
    counts = [r["screened"] for r in low_reports]
    assert all(e == 3 for _, e in counts) and 0 < sum(s for s, _ in counts) < 12
    assert summary["screened"] == sum(s for s, _ in counts) / 12
    assert max(rel_err(low[n] - plain[n], plain[n]) for n in plain) > 1e-6


def test_bad_screen_settings_are_refused():
    model = with_lora(tiny_llama())
    adamw = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    safety = [make_batch(batch=4, seq=6, seed=100, prompt=4)]
    with pytest.raises(ValueError, match="screen must be a cosine"):
        CurvSafe(adamw, model, safety, screen=1.0)
    with pytest.raises(ValueError, match="guard=True"):
        CurvSafe(adamw, model, safety, screen=0.1, guard=False)


def _cosines(rows, safety):
    """Each row's ``-cos(G_i, g)`` from autograd's per-row gradients."""
    g = torch.cat([t.reshape(-1) for t in safety.values()])
    flat = [torch.cat([r[n].reshape(-1) for n in safety]) for r in rows]
    return torch.stack([-(f @ g) / (f.norm() * g.norm()) for f in flat])


def test_a_block_called_twice_in_one_forward_is_scored_on_its_summed_gradient():
    """A linear layer applied twice per forward: each example's gradient is the sum of both calls' products, and
    its norm is that of the sum (not the sum of the two norms), as autograd's per-row gradient says."""
    torch.manual_seed(0)

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(5, 7, dtype=torch.float64)
            self.back = torch.nn.Linear(7, 5, bias=False, dtype=torch.float64)

        def forward(self, x):
            return self.lin(torch.tanh(self.back(self.lin(x))))

    model = Twice()
    blocks = find_blocks(model)
    params = {n: p for b in blocks for n, p in model.named_parameters() if n in b.param_names}
    screen = ExampleScreen(model, blocks, threshold=0.999)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    per_row = model(x).square().sum((1, 2))
    rows = [dict(zip(params, torch.autograd.grad(per_row[i], list(params.values()), retain_graph=True)))
            for i in range(4)]
    screen.clear()
    safety = {n: torch.randn_like(p) for n, p in params.items()}
    model(x).square().sum().backward()
    screen.apply(params, safety)
    assert rel_err(screen.cosines, _cosines(rows, safety)) < 1e-10


def test_blocks_of_one_shape_share_a_tensor_and_one_a_pass_skips_counts_as_zero(monkeypatch):
    """Blocks whose per-example gradients have one shape are kept in one tensor per pass; a protected block that a
    pass does not call contributes nothing to its rows (its place is zeroed, not left as uninitialised memory or
    the last step's values), with a pass that calls it in the same step: the cosines are autograd's per-row ones of
    both passes' rows, at each step."""
    torch.manual_seed(0)

    class Branch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(6, 6, bias=False, dtype=torch.float64)
            self.b = torch.nn.Linear(6, 6, bias=False, dtype=torch.float64)
            self.out = torch.nn.Linear(6, 3, dtype=torch.float64)

        def forward(self, x, use_b: bool):
            h = torch.tanh(self.a(x))
            return self.out(torch.tanh(self.b(h)) if use_b else h)

    model = Branch()
    blocks = find_blocks(model)
    params = {n: p for b in blocks for n, p in model.named_parameters() if n in b.param_names}
    screen = ExampleScreen(model, blocks, threshold=0.999)
    assert sorted(len(names) for names in screen._groups.values()) == [1, 1, 2]  # a and b together; out; its bias
    xs = [torch.randn(5, 4, 6, dtype=torch.float64) for _ in range(2)]
    rows = []
    for x, use_b in zip(xs, (True, False)):
        per_row = model(x, use_b).square().sum((1, 2))
        rows += [dict(zip(params, torch.autograd.grad(per_row[i], list(params.values()), retain_graph=True,
                                                      allow_unused=True))) for i in range(5)]
    rows = [{n: torch.zeros_like(params[n]) if g is None else g for n, g in r.items()} for r in rows]
    screen.clear()
    safety = {n: torch.randn_like(p) for n, p in params.items()}
    empty = torch.empty  # the pass tensors start uninitialised: make that memory NaN here
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    for _ in range(2):  # the second step writes into the first's tensors (kept for it on CPU)
        model.zero_grad()
        for x, use_b in zip(xs, (True, False)):
            model(x, use_b).square().sum().backward()
        assert screen.pending == 10
        screen.apply(params, safety)
        assert not screen.mismatch
        assert rel_err(screen.cosines, _cosines(rows, safety)) < 1e-10
        assert len(screen._spare) == 3  # one pass's tensors kept, one per stored shape


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_screens_the_same_examples_bit_for_bit(reentrant):
    """HF gradient checkpointing reruns each layer's forward in the backward (reentrant: the first forward runs
    without gradients): the screen sees every example once, and the steps equal those without checkpointing."""
    def run(checkpointing):
        model = with_lora(tiny_llama())
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model.train()
        opt = CurvSafe(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2), model,
                       [make_batch(seed=9)], screen=0.0)
        cosines = []
        for seed in range(3):
            opt.zero_grad()
            model(**make_batch(seed=seed)).loss.backward()
            opt.step()
            assert not opt.constraint.screen.mismatch
            cosines.append(opt.constraint.screen.cosines)
        return cosines, [p.detach() for p in model.parameters() if p.requires_grad]

    (plain, plain_params), (checked, checked_params) = run(False), run(True)
    assert all(c.numel() == 3 and torch.equal(c, d) for c, d in zip(plain, checked))
    assert all(torch.equal(p, q) for p, q in zip(plain_params, checked_params))
