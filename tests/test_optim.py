"""CurvSafe: the projection and guard against dense oracles, optimizer behaviour, persistence, bad input."""

import io

import pytest
import torch
from conftest import make_batch, rel_err, tiny_llama, with_lora

from curvsafe.capture import CaptureError
from curvsafe.curvature import KFAC
from curvsafe.curvature.subspace import SubspaceEigen
from curvsafe.optim import CurvSafe, CurvSafeSettings
from curvsafe.ranks import leave_group


def safety_data(n=2):
    return [make_batch(batch=4, seq=6, seed=100 + s, prompt=4) for s in range(n)]


def train_data(n=4):
    return [make_batch(batch=3, seq=8, seed=s) for s in range(n)]


def lora_model(dtype=torch.float64):
    return with_lora(tiny_llama(dtype=dtype))


def adamw(model, lr=1e-2):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def train(model, opt, batches, scheduler=None):
    model.train()
    for b in batches:
        opt.zero_grad()
        model(**b).loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_strength_zero_without_guard_is_the_wrapped_optimizer_bit_for_bit():
    plain, wrapped = lora_model(), lora_model()
    train(plain, adamw(plain), train_data())
    train(wrapped, CurvSafe(adamw(wrapped), wrapped, safety_data(), strength=0.0, guard=False), train_data())
    for (n, a), b in zip(trainable(plain).items(), trainable(wrapped).values()):
        assert torch.equal(a, b), n


def test_projection_equals_the_dense_damped_inverse_and_spares_other_parameters():
    """One step: each block's applied update is (I + s (A ⊗ G) / mean)^-1 applied to AdamW's update, with A, G the
    K-FAC factors of the anchor loss and mean the mean diagonal of the curvature over all protected blocks;
    parameters outside the protected blocks get AdamW's update unchanged."""
    strength = 3.0
    ref, model = lora_model(), lora_model()
    for m in (ref, model):  # also train the layer norms: they are not protected
        for n, p in m.named_parameters():
            if "norm" in n:
                p.requires_grad_(True)
    opt = CurvSafe(adamw(model), model, safety_data(), strength=strength, guard=False, refresh_batches=None)
    kfac = KFAC(model, [b.name for b in opt.blocks]).fit(opt.constraint.safety.batches)
    before = trainable(model)
    train(ref, adamw(ref), train_data(1))
    train(model, opt, train_data(1))
    after, plain = trainable(model), trainable(ref)
    protected = set(opt.constraint.params)
    # column-major vec: vec(G U A) = (A ⊗ G) vec(U); the mean eigenvalue is over all protected parameters
    krons = {b.name: torch.kron(kfac.factors[b.name].A.double(), kfac.factors[b.name].G.double()) for b in opt.blocks}
    mean = sum(k.trace() for k in krons.values()) / sum(k.shape[0] for k in krons.values())
    for block in opt.blocks:
        kron = krons[block.name]
        U = block.as_matrix(plain[block.weight_name] - before[block.weight_name]).double()
        damped = torch.linalg.solve(torch.eye(kron.shape[0], dtype=kron.dtype) + strength * kron / mean,
                                    U.T.reshape(-1))
        expected = damped.reshape(U.shape[1], U.shape[0]).T
        applied = block.as_matrix(after[block.weight_name] - before[block.weight_name])
        assert rel_err(applied, expected) < 1e-5, block.name
    others = [n for n in after if n not in protected]
    assert others, "the test needs unprotected trainable parameters"
    for n in others:
        assert torch.equal(after[n], plain[n]), n


@pytest.mark.parametrize("strength", [0.0, 1.0])
def test_guard_keeps_every_update_from_raising_the_safety_loss_to_first_order(strength):
    model = lora_model()
    # training on the safety prompts with other responses pushes directly against the anchor
    attack = [{**b, "labels": b["labels"].where(b["labels"] == -100, (b["labels"] + 5) % 23)} for b in safety_data()]
    opt = CurvSafe(adamw(model, lr=5e-2), model, safety_data(), strength=strength, refresh_every=1)
    unguarded = lora_model()
    raw_opt = adamw(unguarded, lr=5e-2)
    pushed = 0
    for step in range(4):
        batch = attack[step % 2]
        before = {n: p.detach().clone() for n, p in opt.constraint.params.items()}
        train(model, opt, [batch])
        grad = opt.constraint.sides[0].grad  # the safety gradient this step was guarded with
        applied = sum(float(((p.detach() - before[n]) * grad[n]).sum()) for n, p in opt.constraint.params.items())
        norm = sum(float((p.detach() - before[n]).norm() ** 2) for n, p in opt.constraint.params.items()) ** 0.5
        gnorm = float(opt.constraint.gram[0, 0]) ** 0.5
        assert applied <= 1e-9 * norm * gnorm, (step, applied)
        # the same step without the guard does push against safety (so the guard had work to do)
        unguarded.load_state_dict(model.state_dict())
        start = {n: p.detach().clone() for n, p in unguarded.named_parameters() if n in before}
        train(unguarded, raw_opt, [batch])
        raw = sum(float(((p.detach() - start[n]) * grad[n]).sum()) for n, p in unguarded.named_parameters()
                  if n in start)
        pushed += raw > 0
    assert pushed > 0


@pytest.mark.parametrize("side", ["safety only", "benign", "monitor", "subspace"])
def test_state_dict_round_trip_resumes_the_uninterrupted_run(side):
    """Also with warm-started truncated eigenbases (``subspace``): the refresh after the resume starts from the
    saved bases, as the uninterrupted run's does."""
    kw = dict(refresh_every=2, strength=2.0, benign_batches=benign_data() if side == "benign" else None,
              monitor_batches=monitor_data() if side == "monitor" else None)
    if side == "subspace":
        kw["subspace"] = SubspaceEigen(min_dim=4, rank=3)
    data = train_data(6)
    full = lora_model()
    opt = CurvSafe(adamw(full), full, safety_data(), **kw)
    train(full, opt, data)

    first = lora_model()
    opt1 = CurvSafe(adamw(first), first, safety_data(), **kw)
    train(first, opt1, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = lora_model()
    resumed.load_state_dict(saved["model"])
    opt2 = CurvSafe(adamw(resumed), resumed, safety_data(), **kw)  # records its own anchor; the saved one wins
    opt2.load_state_dict(saved["optimizer"])
    assert opt2.step_count == 3
    train(resumed, opt2, data[3:])
    for (n, a), b in zip(trainable(full).items(), trainable(resumed).values()):
        assert torch.equal(a, b), n
    assert opt2.monitor_rise == opt.monitor_rise and (opt.monitor_rise is not None) == (side == "monitor")
    assert bool(opt2.constraint.projector.rests) == (side == "subspace")


def test_dcp_keeps_the_wrapped_state_and_the_safety_state_restores_the_rest(caplog):
    """``torch.distributed.checkpoint``'s optimizer state dict (accelerate's FSDP checkpoints) keeps only ``state``
    and ``param_groups``: it loads with a warning, and :meth:`load_safety_state_dict` restores CurvSafe's own part,
    after which the resumed run is the uninterrupted one."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    kw = dict(refresh_every=2, strength=2.0, benign_batches=benign_data())
    data = train_data(6)
    full = lora_model()
    train(full, CurvSafe(adamw(full), full, safety_data(), **kw), data)

    first = lora_model()
    opt1 = CurvSafe(adamw(first), first, safety_data(), **kw)
    train(first, opt1, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": get_optimizer_state_dict(first, opt1),
                "curvsafe": opt1.safety_state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert set(saved["optimizer"]) == {"state", "param_groups"}  # what DCP keeps of CurvSafe's state_dict

    resumed = lora_model()
    resumed.load_state_dict(saved["model"])
    opt2 = CurvSafe(adamw(resumed), resumed, safety_data(), **kw)
    with caplog.at_level("WARNING", logger="curvsafe.optim.curvsafe"):
        set_optimizer_state_dict(resumed, opt2, saved["optimizer"])
    assert "holds no CurvSafe state" in caplog.text
    assert opt2.step_count == 0 and opt2.refresh_count == 0  # DCP's state-creating step was AdamW's alone
    opt2.load_safety_state_dict(saved["curvsafe"])
    assert opt2.step_count == 3
    train(resumed, opt2, data[3:])
    for (n, a), b in zip(trainable(full).items(), trainable(resumed).values()):
        assert torch.equal(a, b), n



def test_a_first_step_at_learning_rate_zero_with_gradients_is_a_step():
    """Only a step without gradients at learning rate 0 (DCP's state creation) is left to the wrapped optimizer: a
    warm-up's first step from learning rate 0 refreshes and counts."""
    model = lora_model()
    opt = CurvSafe(adamw(model, lr=0.0), model, safety_data())
    train(model, opt, train_data(1))
    assert opt.step_count == 1 and opt.refresh_count == 1

def test_a_state_dict_of_another_layout_or_version_is_refused_before_anything_loads():
    model = lora_model()
    opt = CurvSafe(adamw(model), model, safety_data())
    train(model, opt, train_data(1))
    state = opt.state_dict()
    with pytest.raises(ValueError, match="older CurvSafe"):
        opt.load_state_dict({"optimizer": opt.optimizer.state_dict(), "curvsafe": state["curvsafe"]})
    with pytest.raises(ValueError, match="version 6 is not"):
        opt.load_state_dict({**state, "curvsafe": {**state["curvsafe"], "version": 6}})
    assert opt.step_count == 1


def test_a_state_of_the_version_before_rescale_resumes_as_it_ran():
    """Version 7 states name no ``rescale``: they ran without it, so they load with ``rescale=1``."""
    model = lora_model()
    opt = CurvSafe(adamw(model), model, safety_data())
    train(model, opt, train_data(1))
    state = opt.state_dict()
    settings = {k: v for k, v in state["curvsafe"]["settings"].items() if k != "rescale"}
    opt.load_state_dict({**state, "curvsafe": {**state["curvsafe"], "version": 7, "settings": settings}})
    assert opt.settings.rescale == 1.0 and opt.step_count == 1


def test_a_state_of_the_version_before_the_monitor_resumes_without_one():
    """Version 8 states hold no monitor: they load with none (the saved state replaces this one's)."""
    model = lora_model()
    opt = CurvSafe(adamw(model), model, safety_data(), monitor_batches=monitor_data())
    train(model, opt, train_data(1))
    state = opt.state_dict()
    own = {k: v for k, v in state["curvsafe"].items() if k != "monitor"}
    opt.load_state_dict({**state, "curvsafe": {**own, "version": 8}})
    assert opt.constraint.monitor is None and opt.monitor_rise is None and opt.step_count == 1
    train(model, opt, train_data(1))
    assert opt.report.monitor is None and "monitor" not in opt.constraint.summary()


def test_a_state_of_the_version_before_warm_eigenbases_resumes_as_it_ran():
    """Version 9 states name no ``subspace`` and their ``low_rank`` no ``mean_rest``: every dense factor had a full
    eigh and every sketched one the energy-weighted rest, so they load with ``subspace=None`` and
    ``mean_rest=False``; this version's own states keep the default (None: the projection's mean rest)."""
    model = lora_model()
    opt = CurvSafe(adamw(model), model, safety_data())
    train(model, opt, train_data(1))
    state = opt.state_dict()
    assert opt.settings.low_rank.mean_rest is None and state["curvsafe"]["settings"]["low_rank"]["mean_rest"] is None
    settings = {k: v for k, v in state["curvsafe"]["settings"].items() if k != "subspace"}
    settings["low_rank"] = {k: v for k, v in settings["low_rank"].items() if k != "mean_rest"}
    opt.load_state_dict({**state, "curvsafe": {**state["curvsafe"], "version": 9, "settings": settings}})
    assert opt.settings.subspace is None and opt.settings.low_rank.mean_rest is False and opt.step_count == 1
    opt.load_state_dict(state)
    assert opt.settings.subspace is not None and opt.settings.low_rank.mean_rest is None


def test_warm_truncated_eigenbases_project_as_full_ones_when_the_rank_covers_the_factors():
    """Two safety prompts of 3 tokens with one-token anchors: every factor has rank <= 6 (the tokens), so keeping 7
    eigenpairs of each factor of dimension >= 8 (warm-started after the first refresh) projects as the full
    decompositions do, and the truncated path is the one taken."""
    safety = [make_batch(batch=2, seq=3, pad=False, prompt=2, seed=100)]
    runs = {}
    for key, sub in (("full", None), ("warm", SubspaceEigen(min_dim=8, rank=7))):
        m = lora_model()
        opt = CurvSafe(adamw(m), m, safety, subspace=sub, refresh_every=1, ema_decay=0.0, prefix_tokens=1)
        train(m, opt, train_data(4))
        runs[key] = (m, opt)
    rests = runs["warm"][1].constraint.projector.rests
    assert rests and not runs["full"][1].constraint.projector.rests
    assert all(QA.shape[1] <= 7 or QG.shape[1] <= 7 for QA, QG, *_ in
               (runs["warm"][1].constraint.projector.eigen[n] for n in rests))
    for (n, a), b in zip(trainable(runs["full"][0]).items(), trainable(runs["warm"][0]).values()):
        assert rel_err(b, a) < 1e-5, n


@pytest.mark.parametrize("rescale", [1.5, 50.0])
def test_rescale_keeps_the_projected_direction_at_the_wrapped_steps_length(rescale):
    """Without the guard, a step with ``rescale`` is the step with ``rescale=1`` (the projection alone) times
    ``min(rescale, |u| / |Pu|)``: the same direction, back toward the wrapped optimizer's length (all of it when
    the cap allows)."""
    steps = {}
    for r in (1.0, rescale):
        torch.manual_seed(0)
        model = lora_model()
        sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        opt = CurvSafe(sgd, model, safety_data(), guard=False, rescale=r)
        batch = train_data(1)[0]
        before = {n: p.detach().clone() for n, p in opt.constraint.params.items()}
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
        steps[r] = ({n: p.detach() - before[n] for n, p in opt.constraint.params.items()}, opt.report)
    plain, report = steps[1.0]
    scaled = steps[rescale][0]
    ratio = (float(report.update_sq) / float(report.projected_sq)) ** 0.5
    assert ratio > 1.2  # the projection removed some of the update
    for n in plain:
        torch.testing.assert_close(scaled[n], min(rescale, ratio) * plain[n], rtol=1e-5, atol=1e-8)
    if rescale > ratio:
        length = sum(float(v.square().sum()) for v in scaled.values())
        assert length == pytest.approx(float(report.update_sq), rel=1e-5)

def test_lr_scheduler_and_gradient_accumulation():
    model = lora_model()
    opt = CurvSafe(adamw(model, lr=1e-2), model, safety_data())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    train(model, opt, train_data(2), scheduler=sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 3)
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 3)
    assert opt.step_count == 2

    a, b = lora_model(), lora_model()
    opt_a, opt_b = CurvSafe(adamw(a), a, safety_data()), CurvSafe(adamw(b), b, safety_data())
    x, y = train_data(2)
    a.train(), b.train()
    (a(**x).loss + a(**y).loss).backward()  # one step on the summed loss
    opt_a.step()
    b(**x).loss.backward()  # the same gradient, accumulated over two micro-batches
    b(**y).loss.backward()
    opt_b.step()
    assert opt_b.step_count == 1
    for (n, p), q in zip(trainable(a).items(), trainable(b).values()):
        assert rel_err(q, p) < 1e-10, n


def test_grad_scaler_steps_match_and_skip_non_finite_gradients():
    a, b = lora_model(torch.float32), lora_model(torch.float32)
    opt_a = CurvSafe(adamw(a), a, safety_data())
    opt_b = CurvSafe(adamw(b), b, safety_data())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    batch = train_data(1)[0]
    a.train(), b.train()
    a(**batch).loss.backward()
    opt_a.step()
    scaler.scale(b(**batch).loss).backward()
    scaler.step(opt_b)
    scaler.update()
    for (n, p), q in zip(trainable(a).items(), trainable(b).values()):
        assert rel_err(q, p) < 1e-5, n
    opt_b.zero_grad()
    before = trainable(b)
    scaler.scale(b(**batch).loss * float("inf")).backward()
    scaler.step(opt_b)
    assert opt_b.step_count == 1
    for n, p in trainable(b).items():
        assert torch.equal(p, before[n]), n


def test_param_groups_state_and_add_param_group_are_the_wrapped_optimizers():
    model = lora_model()
    inner = adamw(model)
    opt = CurvSafe(inner, model, safety_data())
    assert opt.param_groups is inner.param_groups and opt.state is inner.state and opt.defaults is inner.defaults
    norm = next(p for n, p in model.named_parameters() if "norm" in n)
    norm.requires_grad_(True)
    opt.add_param_group({"params": [norm], "lr": 1e-3})
    assert len(inner.param_groups) == 2
    with pytest.raises(ValueError, match="not the model's"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    assert "CurvSafe(AdamW" in repr(opt)


def test_bad_input_is_a_clear_error_at_construction():
    model = lora_model()
    with pytest.raises(ValueError, match="safety data is empty"):
        CurvSafe(adamw(model), model, [])
    stray = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="not parameters of the model"):
        CurvSafe(torch.optim.AdamW([stray, *[p for p in model.parameters() if p.requires_grad]]), model,
                 safety_data())
    embed = model.get_input_embeddings().weight
    with pytest.raises(ValueError, match="nothing for CurvSafe to protect"):
        CurvSafe(torch.optim.AdamW([embed]), model, safety_data())
    with pytest.raises(CaptureError, match="match no"):
        CurvSafe(adamw(model), model, safety_data(), modules=["*.no_such_module"])
    with pytest.raises(ValueError, match="objective terms"):
        CurvSafe(adamw(model), model, safety_data(), objective="kindness")
    with pytest.raises(ValueError, match="refresh_every"):
        CurvSafe(adamw(model), model, safety_data(), refresh_every=0)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        CurvSafe(object(), model, safety_data())
    plain = torch.nn.Sequential(torch.nn.Embedding(5, 3))
    with pytest.raises(CaptureError, match="no capturable module"):
        CurvSafe(torch.optim.SGD(plain.parameters(), lr=0.1), plain, safety_data())
    with pytest.raises(ValueError, match="not an optimizer state_dict"):
        CurvSafe(adamw(model), model, safety_data()).load_state_dict({"factors": {}})


def test_settings_are_one_dataclass_for_the_constructor_and_the_saved_state():
    """``CurvSafeSettings`` (validated; keywords replace its fields) is what the optimizer runs with and what
    ``state_dict`` saves; ``load_state_dict`` adopts the saved settings (and the projection strength with them)."""
    model = lora_model()
    base = CurvSafeSettings(strength=2.0, refresh_every=7)
    opt = CurvSafe(adamw(model), model, safety_data(), base, refresh_every=3, objective="anchor+harmful")
    assert (opt.settings.strength, opt.settings.refresh_every, base.refresh_every) == (2.0, 3, 7)
    assert opt.settings.objective == {"anchor": 1.0, "harmful": 1.0}
    with pytest.raises(TypeError, match=r"unknown CurvSafeSettings setting\(s\) \['strenght'\]"):
        CurvSafe(adamw(model), model, safety_data(), strenght=1.0)
    for bad, match in (({"ema_decay": 1.0}, "ema_decay"), ({"drift_steps": 0}, "drift_steps"),
                       ({"fisher_type": "type2"}, "fisher_type"), ({"prefix_tokens": 0}, "prefix_tokens")):
        with pytest.raises(ValueError, match=match):
            CurvSafeSettings(**bad)
    train(model, opt, train_data(2))
    saved = opt.state_dict()
    assert CurvSafeSettings(**saved["curvsafe"]["settings"]) == opt.settings
    other = CurvSafe(adamw(model), model, safety_data(), strength=0.5, objective="anchor+harmful")
    other.load_state_dict(saved)
    assert other.settings == opt.settings and other.constraint.projector.strength == 2.0


def test_the_safety_factors_are_the_kfac_ema_over_refreshes():
    """One EMA, kept by the projector's K-FAC: two refreshes at the same parameters on batches 0 and 1 give
    ``d F(b1) + (1 - d) F(b2)`` with F the K-FAC factors of the anchor batches alone."""
    model = lora_model()
    opt = CurvSafe(adamw(model), model, safety_data(), ema_decay=0.25)
    opt.refresh()
    opt.refresh()
    anchors = opt.constraint.safety.terms[0].batches
    names = [b.name for b in opt.blocks]
    first, second = (KFAC(model, names).fit([b]).factors for b in anchors[:2])
    for n, f in opt.constraint.projector.kfac.factors.items():
        assert rel_err(f.A, 0.25 * first[n].A + 0.75 * second[n].A) < 1e-6, n
        assert rel_err(f.G, 0.25 * first[n].G + 0.75 * second[n].G) < 1e-6, n


@pytest.fixture(scope="module")
def chat_model_and_prompts():
    """A tiny LoRA Llama with the testbed's tokenizer (chat template), and harmful prompts as text."""
    from conftest import llama_config
    from transformers import LlamaForCausalLM

    from curvsafe.testbed.corpus import World
    from curvsafe.testbed.model import build_tokenizer

    world = World(0)
    tok = build_tokenizer(world.words)
    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.eos_token_id)).double()
    return with_lora(base), tok, [e.prompt for e in world.harmful("train")[:6]]


@pytest.mark.parametrize("objective", ["anchor", "refusal", "harmful"])
def test_safety_batches_as_users_hold_them(chat_model_and_prompts, objective):
    """Prompt+response batches (-100 on the prompt), tokenizer output without labels (the whole row is the
    prompt) and prompt strings with the tokenizer; the anchor records responses to the whole prompts, the
    objectives that score given responses refuse prompt-only data, other shapes are one-line errors."""
    from curvsafe.data import Pair, make_batches, render_prompt

    model, tok, prompts = chat_model_and_prompts
    with_responses = make_batches(tok, [Pair(p, "I cannot help with that .") for p in prompts], batch_size=3)
    rendered = [render_prompt(tok, p) for p in prompts]
    from_tokenizer = [dict(tok(rendered[i:i + 3], padding=True, add_special_tokens=False, return_tensors="pt"))
                      for i in (0, 3)]
    shapes = {"prompt+response": with_responses, "tokenizer output": from_tokenizer, "strings": prompts}
    for shape, data in shapes.items():
        if objective != "anchor" and shape != "prompt+response":
            with pytest.raises(ValueError, match="score given responses"):
                CurvSafe(adamw(model), model, data, objective=objective, tokenizer=tok)
            continue
        opt = CurvSafe(adamw(model), model, data, objective=objective, tokenizer=tok, refresh_batches=None)
        if objective == "anchor":  # every anchor row starts with one of the whole prompts, unlabelled
            prompt_ids = [tok(r, add_special_tokens=False)["input_ids"] for r in rendered]
            for batch in opt.constraint.safety.terms[0].batches:
                for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
                    row = ids[mask.bool()].tolist()
                    prompt = next(p for p in prompt_ids if row[:len(p)] == p)
                    assert (labels[:len(prompt)] == -100).all() and (labels[len(prompt):] != -100).any(), shape
        train(model, opt, [make_batch(batch=2, seq=6, vocab=len(tok), seed=1)])
        assert opt.refresh_count == 1, shape


def test_safety_data_of_another_shape_is_a_one_line_error(chat_model_and_prompts):
    model, tok, prompts = chat_model_and_prompts
    for data, needle in [(prompts, "pass tokenizer"), ("one prompt", "safety data is a str"),
                         ({"input_ids": torch.ones(2, 3, dtype=torch.long)}, "single batch"),
                         ([torch.ones(2, 3, dtype=torch.long)], "item 0 is a Tensor"),
                         ([{"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.ones(2, 4)}],
                          "must match input_ids")]:
        with pytest.raises(ValueError, match=needle) as info:
            CurvSafe(adamw(model), model, data)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("strength", [0.0, 3.0])
def test_a_measured_rise_of_the_safety_loss_is_paid_back(strength):
    """Raise S behind the optimizer's back; the next refresh measures the rise over S at construction, and the
    next ``drift_steps`` updates each lower S by rise / drift_steps to first order (<u, g> <= -pay)."""
    from curvsafe.curvature.vectors import dot

    model = lora_model()
    opt = CurvSafe(adamw(model, lr=1e-4), model, safety_data(), strength=strength, refresh_every=100,
                   refresh_tol=None, refresh_batches=None, drift_steps=2)
    train(model, opt, train_data(1))  # the first refresh finds S at its level: nothing owed
    safety, params = opt.constraint.sides[0], opt.constraint.params
    assert safety.owed == 0.0
    with torch.no_grad():
        for n, p in params.items():
            p.add_(0.05 * safety.grad[n] / opt.constraint.gram[0, 0].sqrt())
    opt.refresh()
    rise = opt.safety_level() - sum(safety.levels) / len(safety.levels)
    assert rise > 0 and safety.owed == pytest.approx(rise) and safety.pay == pytest.approx(rise / 2)
    start = opt.safety_level()
    for _ in range(2):
        g, before = dict(safety.grad), {n: p.detach().clone() for n, p in params.items()}
        pay = min(safety.owed, safety.pay)
        train(model, opt, train_data(1))
        u = {n: p.detach() - before[n] for n, p in params.items()}
        assert float(dot(u, g)) <= -pay * (1 - 1e-6)
    assert safety.owed == pytest.approx(0.0, abs=1e-12)
    assert opt.safety_level() < start
    off = CurvSafe(adamw(model), model, safety_data(), restore_drift=False)
    assert off.constraint.sides[0].levels == [] and off.constraint.sides[0].owed == 0.0


@pytest.mark.parametrize("objective", ["anchor", "refusal", "anchor+harmful"])
def test_lora_dropout_does_not_read_as_drift(objective):
    """The safety levels are measured in eval mode (like every safety pass): with LoRA dropout 0.5, a model built in
    eval mode and refreshed in train mode at unchanged parameters owes nothing (in train mode the dropout's loss
    would be read as a rise of the safety loss and paid back); the K-FAC pass's loss is the level it measures."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                    lora_dropout=0.5))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    model.eval()
    batches = safety_data()
    opt = CurvSafe(adamw(model), model, batches, objective=objective, refresh_batches=1)
    model.train()
    for _ in range(2):
        opt.refresh()
        assert opt.constraint.sides[0].owed == 0.0
    if objective == "anchor":
        index = (opt.refresh_count - 1) % len(batches)
        c = opt.constraint
        assert c.projector.kfac.mean_loss == opt.safety_level(index) == c.sides[0].levels[index]


def benign_data():
    return [make_batch(batch=4, seq=6, seed=200 + s, prompt=4) for s in range(2)]


def monitor_data():
    return [make_batch(batch=4, seq=6, seed=300 + s, prompt=4) for s in range(2)]


def test_the_monitor_reads_held_out_prompts_and_changes_no_update():
    """The monitor's rise is its anchor NLL (the model's own greedy answers at construction) at each refresh minus
    at construction, in eval mode; it changes no step: the run with it takes the steps of the run without, bit for
    bit."""
    from curvsafe.anchors import anchor_batches, keep_response_prefix
    from curvsafe.curvature.loss import curvature_mode
    from curvsafe.nll import token_mean_nll

    data, kw = train_data(4), dict(strength=2.0, refresh_every=1, refresh_tol=None, screen=0.0)
    plain = lora_model()
    train(plain, CurvSafe(adamw(plain), plain, safety_data(), **kw), data)
    model = lora_model()
    opt = CurvSafe(adamw(model), model, safety_data(), monitor_batches=monitor_data(), **kw)
    monitored = opt.constraint.monitor.batches
    with torch.no_grad(), curvature_mode(model):
        own = keep_response_prefix(anchor_batches(model, monitor_data(), **opt.constraint._generation), 4)
        level = float(token_mean_nll(model, monitored))
    for a, b in zip(own, monitored):
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "attention_mask", "labels"))

    def rise() -> float:
        with torch.no_grad(), curvature_mode(model):
            return float(token_mean_nll(model, monitored)) - level

    rises = []
    for batch in data:
        rises.append(rise())  # the parameters this step's refresh sees
        train(model, opt, [batch])
        assert opt.report.monitor == pytest.approx(rises[-1], abs=1e-10) and opt.monitor_rise == opt.report.monitor
    assert rises[0] == 0 and min(abs(r) for r in rises[1:]) > 1e-6  # the steps moved it
    assert opt.constraint.summary()["monitor"] == opt.monitor_rise
    assert opt.constraint.measure_monitor() == pytest.approx(rise(), abs=1e-10)
    for (n, a), b in zip(trainable(plain).items(), trainable(model).values()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="no monitor"):
        CurvSafe(adamw(plain), plain, safety_data()).constraint.measure_monitor()


@pytest.mark.parametrize("strength", [0.0, 2.0])
def test_benign_side_keeps_both_constraints_to_first_order(strength):
    """With benign prompts, every applied update lowers S by its payback and the benign anchor B by its own
    (<u, g> <= -r, <u, b> <= -r_B), where the update alone would break at least one of them."""
    from curvsafe.curvature.vectors import dot
    from curvsafe.objectives import LossTerm, Objective

    model = lora_model()
    attack = [{**b, "labels": b["labels"].where(b["labels"] == -100, (b["labels"] + 5) % 23)}
              for b in safety_data() + benign_data()]
    opt = CurvSafe(adamw(model, lr=5e-2), model, safety_data(), benign_batches=benign_data(), strength=strength,
                   refresh_every=1000, refresh_tol=None, refresh_batches=None)
    assert len(opt.constraint.sides) == 2 and len(opt.constraint.sides[1].levels) == 2
    binding = 0
    for step in range(6):
        opt.refresh()  # this step's gradients and paybacks
        safety, benign = opt.constraint.sides
        g, b = dict(safety.grad), dict(benign.grad)
        pay, bpay = min(safety.owed, safety.pay), min(benign.owed, benign.pay)
        before = {n: p.detach().clone() for n, p in opt.constraint.params.items()}
        train(model, opt, [attack[step % 4]])
        u = {n: p.detach() - before[n] for n, p in opt.constraint.params.items()}
        tol = 1e-9 * float(sum(x.norm() ** 2 for x in u.values())) ** 0.5
        on_s, on_b = float(dot(u, g)) + pay, float(dot(u, b)) + bpay
        assert on_s <= tol * float(opt.constraint.gram[0, 0]) ** 0.5 and on_b <= tol * float(dot(b, b)) ** 0.5, step
        binding += abs(on_b) <= 1e-6 * abs(float(dot(u, b))) + 1e-12
    assert binding > 0  # the benign constraint was active (the attack pushes against it)
    # the benign gradient is the exact gradient of the benign anchor on the batches it was refreshed on
    opt.refresh()
    benign = opt.constraint.sides[1]
    exact = Objective([LossTerm("benign", benign.loss.batches)]).gradient(model, opt.constraint.params)[1]
    for n, x in benign.grad.items():
        assert rel_err(x, exact[n]) < 1e-6, n


def test_halfspace_multipliers_are_the_projection_onto_both_constraints():
    """Against the brute-force minimal correction over a grid of random cases (one or two active constraints,
    already feasible, parallel gradients)."""
    from curvsafe.optim.guard import halfspace_multipliers

    gen = torch.Generator().manual_seed(0)
    for case in range(200):
        grads = torch.randn(2, 5, generator=gen, dtype=torch.float64)
        if case % 10 == 0:
            grads[1] = 2.0 * grads[0]  # parallel: the pair is singular
        u = torch.randn(5, generator=gen, dtype=torch.float64)
        pay = torch.rand(2, generator=gen, dtype=torch.float64) * (case % 3)
        excess = grads @ u + pay
        gram = grads @ grads.T
        coefs = halfspace_multipliers(excess, gram)
        if coefs is None:
            assert (excess <= 0).all()
            continue
        assert (coefs >= 0).all()
        new = u - coefs @ grads
        assert ((grads @ new + pay) <= 1e-9).all(), case
        # minimal: no feasible point of the form u - c g (c >= 0) is closer to u (KKT: complementary slackness)
        after = grads @ new + pay
        assert all(c == 0 or abs(a) < 1e-9 for c, a in zip(coefs, after)), case


def test_benign_side_needs_the_guard():
    model = lora_model()
    with pytest.raises(ValueError, match="guard"):
        CurvSafe(adamw(model), model, safety_data(), benign_batches=benign_data(), guard=False)


@pytest.mark.parametrize("objective", ["refusal", "harmful", "anchor+harmful"])
def test_other_objectives_guard_their_own_gradient(objective):
    """Objectives whose gradient is not the K-FAC pass's by-product (a raised NLL, sums) take the exact one."""
    from curvsafe.objectives import Objective

    model = lora_model()
    opt = CurvSafe(adamw(model), model, safety_data(), objective=objective, refresh_every=1, refresh_batches=None)
    train(model, opt, train_data(1))
    opt.refresh()
    expected = Objective(opt.constraint.safety.terms).gradient(model, opt.constraint.params)[1]
    for n, g in opt.constraint.sides[0].grad.items():
        assert rel_err(g, expected[n]) < 1e-6, n


def _parallel_run(rank=None, port=None, out_dir=None, steps=3, wrap="ddp", dtype=torch.float64, settings=None,
                  ranks=2):
    """Each of ``ranks`` ranks trains on its own batches and safety shard, its model wrapped in DDP or sharded with
    FSDP2 (``fully_shard`` per decoder layer and at the root); ``rank=None`` is one process on the union."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from curvsafe.curvature.sharded import whole

    if rank is not None:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks)
    try:
        model = lora_model(dtype)
        # a safety batch position under DDP / FSDP means the union of the ranks' batches there (its level, its
        # ceiling): one process holds the ranks' two batches as one
        safety = ([{k: torch.cat([b[k] for b in safety_data(ranks)]) for k in safety_data()[0]}] if rank is None
                  else safety_data(ranks)[rank::ranks])
        data = [make_batch(batch=2, seq=8, seed=s, pad=False) for s in range(ranks * steps)]
        net = model

        def shard():  # "hsdp-RxS": HSDP on a 2-D mesh, R replicas of S shards (FSDP2's placements for it)
            mesh = (init_device_mesh("cpu", tuple(map(int, wrap[5:].split("x"))), mesh_dim_names=("replicate",
                                                                                                   "shard"))
                    if wrap.startswith("hsdp") else init_device_mesh("cpu", (ranks,)))
            # "fsdp2-bf16": FSDP2's mixed precision (bf16 forward and backward, fp32 gradient reduction and weights)
            policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                      if wrap == "fsdp2-bf16" else MixedPrecisionPolicy())
            for layer in model.base_model.model.model.layers:
                fully_shard(layer, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)

        if rank is not None and wrap == "ddp":
            net = DistributedDataParallel(model)
        elif rank is not None and (wrap in ("fsdp2", "fsdp2-bf16") or wrap.startswith("hsdp")):
            shard()
        opt = CurvSafe(adamw(model, lr=5e-2), net, safety, refresh_every=2, strength=2.0, refresh_batches=None,
                       **(settings or {}))
        if rank is not None and wrap == "fsdp2-after":  # as accelerate / the HF Trainer: shard the model after the
            names = {id(p): n for n, p in model.named_parameters()}  # optimizer is built, then swap its params
            shard()
            sharded = dict(model.named_parameters())
            for group in opt.optimizer.param_groups:
                group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        net.train()
        screened = []  # with screening: (examples screened, examples) per step, over all ranks
        for step in range(steps):
            opt.zero_grad()
            if rank is None:  # DDP averages the ranks' gradients
                (sum(model(**data[ranks * step + r]).loss for r in range(ranks)) / ranks).backward()
            else:
                net(**data[ranks * step + rank]).loss.backward()
            opt.step()
            screened.append(opt.report.screened)
        result = {n: whole(p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        refreshes = opt.refresh_count
        if rank is not None:
            torch.save({"params": result, "refreshes": refreshes, "screened": screened},
                       os.path.join(out_dir, f"rank{rank}.pt"))
        model = net = opt = None  # freed before the group is left (a sharded model holds it)
        return result, refreshes, screened
    finally:
        if rank is not None:
            leave_group()


@pytest.mark.parametrize("wrap, dtype, settings", [
    ("ddp", torch.float64, {}), ("fsdp2", torch.float64, {}), ("fsdp2", torch.float32, {}),
    ("fsdp2", torch.float32, {"objective": "anchor+harmful"}),  # the exact safety gradient, not K-FAC's by-product
    ("fsdp2-after", torch.float64, {}), ("hsdp-2x1", torch.float64, {}), ("hsdp-1x2", torch.float64, {}),
    ("fsdp2", torch.float64, {"low_rank": {"max_dense_dim": 8, "rank": 4, "oversample": 4, "probes": 2}}),
    ("ddp", torch.float64, {"screen": 0.0}), ("fsdp2", torch.float64, {"screen": 0.0}),
    ("hsdp-2x1", torch.float64, {"screen": 0.0})],
    ids=["ddp", "fsdp2", "fsdp2-float32", "fsdp2-float32-exact-gradient", "fsdp2-sharded-after-construction",
         "hsdp-2-replicas", "hsdp-2-shards", "fsdp2-memory-bounded-factors", "ddp-example-screening",
         "fsdp2-example-screening", "hsdp-2-replicas-example-screening"])
def test_two_gloo_ranks_apply_the_identical_projection_equal_to_one_process(tmp_path, wrap, dtype, settings):
    """FSDP2 runs on CPU here (gloo): the sharded steps equal one process's on the union of the data (the
    safety passes leave FSDP's training gradients alone; each rank writes its shard of the same update)."""
    import torch.multiprocessing as mp
    from test_distributed import free_port

    mp.spawn(_parallel_run, args=(free_port(), str(tmp_path), 3, wrap, dtype, settings), nprocs=2, join=True)
    _check_ranks_equal_one_process(tmp_path, 2, dtype, settings)


def _check_ranks_equal_one_process(tmp_path, ranks, dtype, settings):
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(ranks)]
    single, refreshes, screened = _parallel_run(dtype=dtype, settings=settings, ranks=ranks)
    start = trainable(lora_model(dtype))
    for r in results:
        assert r["refreshes"] == refreshes >= 2 and r["screened"] == screened
    if (settings or {}).get("screen") is not None:  # every rank screens its own rows, counted over all of them
        assert all(e == 2 * ranks for _, e in screened) and 0 < sum(s for s, _ in screened) < 2 * ranks * len(screened)
    for n, expected in single.items():
        assert all(torch.equal(results[0]["params"][n], r["params"][n]) for r in results[1:]), n
        assert rel_err(results[0]["params"][n] - start[n], expected - start[n]) < 1e-5, n


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_three_gloo_ranks_equal_one_process(tmp_path, wrap):
    """Nothing assumes two ranks: 3 ranks (FSDP2's row chunks uneven, a LoRA A of 2 rows leaves one rank an empty
    shard) take one process's steps on the union of their data."""
    import torch.multiprocessing as mp
    from test_distributed import free_port

    mp.spawn(_parallel_run, args=(free_port(), str(tmp_path), 3, wrap, torch.float64, None, 3), nprocs=3, join=True)
    _check_ranks_equal_one_process(tmp_path, 3, torch.float64, None)



def _dcp_resume_run(rank, port, out_dir):
    """On 2 gloo ranks with FSDP2: 3 uninterrupted steps, then 2 steps, a checkpoint as accelerate writes it (model
    and optimizer through ``torch.distributed.checkpoint``, CurvSafe's own state per rank beside it), a new model
    and CurvSafe loaded from it, and the third step. Each rank saves both results."""
    import os

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from curvsafe.curvature.sharded import whole

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        data = [make_batch(batch=2, seq=8, seed=s, pad=False) for s in range(6)]

        def sharded_run():
            model = lora_model()
            for layer in model.base_model.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            return model, CurvSafe(adamw(model, lr=5e-2), model, safety_data()[rank::2], refresh_every=2,
                                   strength=2.0, refresh_batches=None)

        def steps(model, opt, which):
            model.train()
            for step in which:
                opt.zero_grad()
                model(**data[2 * step + rank]).loss.backward()
                opt.step()

        def lora(model):
            return {n: whole(p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}

        model, opt = sharded_run()
        steps(model, opt, range(3))
        straight = lora(model)

        model, opt = sharded_run()
        steps(model, opt, range(2))
        ckpt = os.path.join(out_dir, "ckpt")
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=ckpt)
        torch.save(opt.safety_state_dict(), os.path.join(out_dir, f"curvsafe_rank{rank}.pt"))
        dist.barrier()

        model, opt = sharded_run()
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=ckpt)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        opt.load_safety_state_dict(torch.load(os.path.join(out_dir, f"curvsafe_rank{rank}.pt"), weights_only=True))
        steps(model, opt, [2])
        torch.save({"straight": straight, "resumed": lora(model), "refreshes": opt.refresh_count},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        model = opt = None
    finally:
        leave_group()


def test_fsdp2_checkpoint_through_dcp_resumes_the_uninterrupted_run(tmp_path):
    """The checkpoint accelerate writes under FSDP2 (DCP) plus CurvSafe's per-rank state resumes exactly."""
    import torch.multiprocessing as mp
    from test_distributed import free_port

    mp.spawn(_dcp_resume_run, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        out = torch.load(tmp_path / f"rank{r}.pt")
        assert out["refreshes"] >= 2
        for n, expected in out["straight"].items():
            assert torch.equal(out["resumed"][n], expected), (r, n)

def test_fsdp2_mixed_precision_steps_stay_near_the_float32_ones(tmp_path):
    """Under FSDP2's bf16 mixed precision the safety passes, factors and projection see bf16 forwards; the
    weights and updates stay float32, within bf16's rounding of the float32 run's (measured: 1.8e-2)."""
    import torch.multiprocessing as mp
    from test_distributed import free_port

    mp.spawn(_parallel_run, args=(free_port(), str(tmp_path), 3, "fsdp2-bf16", torch.float32, None), nprocs=2,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single, refreshes, _ = _parallel_run(dtype=torch.float32)
    start = trainable(lora_model(torch.float32))
    errors = [rel_err(ranks[0]["params"][n] - start[n], expected - start[n]) for n, expected in single.items()]
    assert ranks[0]["refreshes"] == refreshes and all(p.dtype == torch.float32 for p in ranks[0]["params"].values())
    assert all(torch.equal(ranks[0]["params"][n], ranks[1]["params"][n]) for n in single)
    assert 1e-4 < max(errors) < 5e-2  # bf16 was used, and only bf16's rounding separates the runs


def test_hf_trainer_drives_curvsafe_with_its_scheduler(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = lora_model(torch.float32)
    rows = [{k: v[i] for k, v in make_batch(batch=3, seq=8, seed=s, pad=False).items()} for s in range(4)
            for i in range(3)]
    opt = CurvSafe(adamw(model, lr=1e-2), model, safety_data(), refresh_every=2)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=2,
                             learning_rate=1e-2, lr_scheduler_type="linear", report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True, logging_steps=1, gradient_accumulation_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=rows, optimizers=(opt, None))
    start = trainable(model)
    result = trainer.train()
    assert result.global_step == 6 and opt.step_count == 6
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)  # the Trainer's linear schedule reached the wrapped AdamW
    assert any(not torch.equal(p, start[n]) for n, p in trainable(model).items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by benchmarks/device_check.sh)")
def test_cuda_steps_with_the_triton_projection_match_the_cpu_steps():
    runs = {}
    for device in ("cpu", "cuda"):
        model = lora_model(torch.float32).to(device)
        move = lambda bs: [{k: v.to(device) for k, v in b.items()} for b in bs]  # noqa: E731
        opt = CurvSafe(adamw(model), model, move(safety_data()), refresh_every=2, strength=2.0)
        train(model, opt, move(train_data(3)))
        runs[device] = {n: p.cpu() for n, p in trainable(model).items()}
    start = trainable(lora_model(torch.float32))
    for n, p in runs["cpu"].items():
        assert rel_err(runs["cuda"][n] - start[n], p - start[n]) < 2e-3, n


def test_trl_sft_trainer_drives_curvsafe(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from curvsafe.testbed.model import build_tokenizer

    tok = build_tokenizer([f"w{i}" for i in range(64)])
    model = lora_model(torch.float32)
    vocab = model.get_input_embeddings().num_embeddings
    words = [w for w in tok.get_vocab() if w.startswith("w") and tok.convert_tokens_to_ids(w) < vocab]
    rows = [{"prompt": " ".join(words[i % 5:i % 5 + 4]), "completion": " ".join(words[i % 7:i % 7 + 3])}
            for i in range(8)]
    opt = CurvSafe(adamw(model, lr=1e-2), model, safety_data(), refresh_every=2)
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                         lr_scheduler_type="linear", report_to=[], save_strategy="no", use_cpu=True,
                         disable_tqdm=True, logging_steps=1)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             optimizers=(opt, None))
    start = trainable(model)
    trainer.train()
    assert opt.step_count == 4 and opt.refresh_count >= 2
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)
    assert any(not torch.equal(p, start[n]) for n, p in trainable(model).items())


def test_plain_linear_layers_with_biases_are_projected_and_guarded():
    from conftest import TinyMLPLM

    model = TinyMLPLM().double()
    with pytest.raises(ValueError, match="objective='refusal'"):
        CurvSafe(torch.optim.AdamW(model.parameters()), model, safety_data())
    opt = CurvSafe(torch.optim.AdamW(model.parameters(), lr=1e-2), model, safety_data(), objective="refusal",
                   refresh_every=1)
    assert {"fc1.bias", "fc2.bias"} <= set(opt.constraint.params)
    opt.refresh()  # biases count in the mean eigenvalue: tr(A) tr(G) per weight, tr(G) per bias
    factors = [(opt.constraint.projector.kfac.factors[b.name].A, opt.constraint.projector.kfac.factors[b.name].G)
               for b in opt.blocks]
    mean = (sum(A.trace() * G.trace() + G.trace() for A, G in factors)
            / sum(A.shape[0] * G.shape[0] + G.shape[0] for A, G in factors))
    for block, (A, G) in zip(opt.blocks, factors):
        QA, QG, scale, bias_scale = opt.constraint.projector.eigen[block.name]
        lam_G = torch.linalg.eigvalsh(G.double()).clamp_min(0)
        assert rel_err(bias_scale.double(), 1.0 / (1.0 + opt.settings.strength * lam_G / mean)) < 1e-5
    for s in range(3):
        before = {n: p.detach().clone() for n, p in opt.constraint.params.items()}
        opt.zero_grad()
        model(make_batch(seed=s)["input_ids"]).logits.sum().backward()
        opt.step()
        grad = opt.constraint.sides[0].grad
        dot = sum(float(((p.detach() - before[n]) * grad[n]).sum()) for n, p in opt.constraint.params.items())
        assert dot <= 1e-12


def test_refresh_follows_the_relative_movement_of_the_protected_parameters():
    """A refresh happens exactly when |theta - theta_ref| > refresh_tol |theta_ref| or refresh_every steps have
    passed since the last one."""
    seen = {}
    for lr, tol, every in ((1e-6, 0.1, 3), (5e-2, 0.01, 50), (1e-2, 0.05, 4)):
        model = lora_model()
        opt = CurvSafe(adamw(model, lr=lr), model, safety_data(), refresh_tol=tol, refresh_every=every)
        refreshed, expected, last, reference = [], [], 0, None
        original = opt.constraint.refresh

        def counting_refresh():
            refreshed.append(opt.step_count)
            original()

        opt.constraint.refresh = counting_refresh
        for step, batch in enumerate(train_data(8)):
            params = list(opt.constraint.params.values())
            if reference is None or step - last >= every or (
                    sum(float((p.detach() - r).norm() ** 2) for p, r in zip(params, reference))
                    > tol ** 2 * sum(float(r.norm() ** 2) for r in reference)):
                expected.append(step)
                last, reference = step, [p.detach().clone() for p in params]
            train(model, opt, [batch])
        assert refreshed == expected, (lr, tol, every)
        seen[lr] = refreshed
    assert seen[1e-6] == [0, 3, 6]  # barely moving: the interval bound alone
    assert len(seen[5e-2]) > 2  # moving fast: refreshed by the tolerance long before 50 steps
    model = lora_model()
    with pytest.raises(ValueError, match="refresh_tol"):
        CurvSafe(adamw(model), model, safety_data(), refresh_tol=0.0)


def test_each_refresh_fits_the_next_safety_batch_and_guards_with_its_gradient():
    from curvsafe.objectives import LossTerm, Objective

    model = lora_model()
    safety = [make_batch(batch=2, seq=6, seed=200 + s, prompt=4) for s in range(3)]
    opt = CurvSafe(adamw(model, lr=1e-2), model, safety, refresh_every=1)
    anchors = opt.constraint.safety.terms[0].batches
    fitted = []
    fit = opt.constraint.projector.kfac.fit
    opt.constraint.projector.kfac.fit = lambda batches, **kw: (fitted.append(batches), fit(batches, **kw))[1]
    for step, batch in enumerate(train_data(5)):  # refresh_batches=1 (default): batch 0, 1, 2, 0, 1
        train(model, opt, [batch])
        assert len(fitted[-1]) == 1 and fitted[-1][0] is anchors[step % 3]
    for k in (1, 2):
        opt.settings.refresh_batches = k
        r = opt.refresh_count
        chosen = [anchors[(r * k + j) % 3] for j in range(k)]
        opt.refresh()
        assert all(a is b for a, b in zip(fitted[-1], chosen, strict=True))
        expected = Objective([LossTerm("anchor", chosen)]).gradient(model, opt.constraint.params)[1]
        for n, g in opt.constraint.sides[0].grad.items():  # the guard's gradient: exact on the batches just fitted
            assert rel_err(g, expected[n]) < 1e-5, n
    with pytest.raises(ValueError, match="refresh_batches"):
        CurvSafe(adamw(model), model, safety, refresh_batches=0)
    empty = dict(safety[0], labels=torch.full_like(safety[0]["labels"], -100))
    with pytest.raises(ValueError, match="batch 0 of the refusal data has no response tokens"):
        CurvSafe(adamw(model), model, [empty, safety[1]], objective="refusal")
    CurvSafe(adamw(model), model, [empty, safety[1]], objective="refusal", refresh_batches=None)


def test_fixed_refresh_interval_without_tolerance():
    model = lora_model()
    opt = CurvSafe(adamw(model, lr=5e-2), model, safety_data(), refresh_tol=None, refresh_every=3)
    steps = []
    original = opt.constraint.refresh
    opt.constraint.refresh = lambda: (steps.append(opt.step_count), original())
    train(model, opt, train_data(7))
    assert steps == [0, 3, 6]


@pytest.mark.parametrize("strength", [0.0, 2.0])
def test_each_step_reports_what_the_constraint_did(strength):
    """``constraint.report``: the wrapped optimizer's update energy (SGD: lr^2 |grad|^2), the energy the projection
    kept (less than all of it with a projection, all of it without), the guard's correction (none: the applied
    update is the projected one; some: the applied update meets the guard's constraint with the payback reported),
    the refreshes and the drift paid and owed; ``summary()`` adds them up since its last call."""
    model = lora_model()
    lr = 0.5
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    opt = CurvSafe(sgd, model, safety_data(), strength=strength, refresh_tol=None, refresh_every=2)
    acted, reports = 0, []
    for step, batch in enumerate(train_data(5)):
        params = opt.constraint.params
        opt.zero_grad()
        model(**batch).loss.backward()
        before = {n: p.detach().clone() for n, p in params.items()}
        grads = {n: p.grad.detach().clone() for n, p in params.items()}
        opt.step()
        r = opt.report
        assert r.step == step and (r.refresh_seconds is not None) == (step % 2 == 0)
        u_sq = sum(float((lr * g).square().sum()) for g in grads.values())
        assert float(r.update_sq) == pytest.approx(u_sq, rel=1e-10)
        if strength == 0:
            assert float(r.projected_sq) == float(r.update_sq)
        else:
            assert 0 < float(r.projected_sq) < float(r.update_sq)
        applied_sq = sum(float((p.detach() - before[n]).square().sum()) for n, p in params.items())
        if float(r.correction_sq) == 0:  # the projected update, rescaled toward the wrapped step's length
            ratio = float(r.update_sq) / float(r.projected_sq)
            assert applied_sq == pytest.approx(float(r.projected_sq) * min(opt.settings.rescale ** 2, ratio), rel=1e-9)
        else:  # the applied update u' meets <u', g> <= -r
            acted += 1
            g = opt.constraint.sides[0].grad
            on_g = sum(float(((p.detach() - before[n]) * g[n]).sum()) for n, p in params.items())
            assert on_g <= -r.paid[0] + 1e-9 * float(r.correction_sq) ** 0.5
        d = r.as_dict()
        assert d["kept"] == pytest.approx(float(r.projected_sq) / u_sq) and len(d["paid"]) == len(d["owed"]) == 1
        if strength > 0 and step % 2 == 0:  # a refresh: the projection's curvature summary, over every weight
            assert d["spectrum"]["directions"] == sum(opt.constraint.params[b.weight_name].numel()
                                                      for b in opt.blocks)
            assert 0 < d["spectrum"]["damped"] < 1 and d["spectrum"]["top"] > 1
        else:
            assert d["spectrum"] is None
        reports.append(d)
    assert acted > 0
    # the summary since the last one (the Trainer's logs): energy-weighted over the steps, then reset
    done, energy = opt.constraint.summary(), sum(d["update_sq"] for d in reports)
    assert done["steps"] == 5 and done["refreshes"] == 3
    spectra = [d["spectrum"] for d in reports if d["spectrum"]]  # with a projection: the latest one in the summary
    assert [done.get(k) for k in ("damped", "effective_rank")] == (
        [spectra[-1]["damped"], spectra[-1]["effective_rank"]] if strength > 0 else [None, None])
    assert done["kept"] == pytest.approx(sum(d["projected_sq"] for d in reports) / energy, rel=1e-6)
    assert done["guard"] == pytest.approx(sum(d["correction_sq"] for d in reports) / energy, rel=1e-6)
    assert opt.constraint.summary() == {}


def _brute_spectrum(blocks, mean, damp):
    """The spectrum summary from every Kronecker eigenvalue written out (rests repeated ``dim - k`` times)."""
    lams = []
    for (lam_A, rest_A, d_A), (lam_G, rest_G, d_G) in blocks:
        full = [torch.cat([lam.double(), torch.full((d - lam.numel(),), float(rest), dtype=torch.float64)])
                if rest is not None else lam.double() for lam, rest, d in ((lam_A, rest_A, d_A), (lam_G, rest_G, d_G))]
        lams.append(torch.outer(full[1], full[0]).reshape(-1))
    lam = torch.cat(lams)
    hit = damp * lam > 1
    return {"directions": lam.numel(), "damped": float(hit.double().mean()),
            "damped_curvature": float(lam[hit].sum() / lam.sum()),
            "effective_rank": float(lam.sum() ** 2 / lam.square().sum()), "top": float(lam.max() / mean)}


def test_the_spectrum_summary_equals_the_written_out_kronecker_eigenvalues():
    """``_spectrum`` (from each factor's eigenvalues, never their products) against every product written out:
    dense factors of a fitted projection, and truncated ones whose rest eigenvalue stands for ``dim - k``."""
    from curvsafe.optim.projector import _spectrum

    model = lora_model()
    opt = CurvSafe(adamw(model), model, safety_data(), strength=3.0, guard=False)
    train(model, opt, train_data(1))
    projector = opt.constraint.projector
    eigen = projector._factor_eigen()
    pairs = [(eigen[f"{b.name}.A"], eigen[f"{b.name}.G"]) for b in opt.blocks]
    mean = projector.strength / projector.damp
    expected = _brute_spectrum([((a[0], None, a[4]), (g[0], None, g[4])) for a, g in pairs], mean, projector.damp)
    assert projector.spectrum == pytest.approx(expected, rel=1e-9)
    assert 0 < expected["damped"] < 1 and 0 < expected["damped_curvature"] < 1

    gen = torch.Generator().manual_seed(0)
    truncated = [((torch.rand(5, generator=gen) * 4, torch.tensor(0.3), 12), (torch.rand(3, generator=gen) * 2,
                                                                             torch.tensor(0.1), 9)),
                 ((torch.rand(4, generator=gen), None, 4), (torch.rand(6, generator=gen) * 3, torch.tensor(0.5), 20))]
    as_eigen = [tuple((lam, None, rest, 0.0, d) for lam, rest, d in block) for block in truncated]
    for damp in (0.0, 0.7, 3.0):
        assert _spectrum(as_eigen, 0.5, damp) == pytest.approx(_brute_spectrum(truncated, 0.5, damp), rel=1e-9)


def test_curvsafe_is_the_safety_constraint_around_the_wrapped_step():
    """CurvSafe delegates: ``SafetyConstraint.begin()``, the wrapped optimizer's step, ``finish()`` on a plain
    optimizer give the same parameters bit for bit."""
    from curvsafe.optim.constraint import SafetyConstraint

    wrapped, plain = lora_model(), lora_model()
    opt = CurvSafe(adamw(wrapped), wrapped, safety_data(), refresh_every=2)
    inner = adamw(plain)
    constraint = SafetyConstraint(plain, inner, safety_data(), CurvSafeSettings(refresh_every=2))
    for batch in train_data(4):
        train(wrapped, opt, [batch])
        inner.zero_grad()
        plain(**batch).loss.backward()
        constraint.begin()
        inner.step()
        constraint.finish()
    assert constraint.steps == opt.step_count == 4 and constraint.refreshes == opt.refresh_count == 2
    for (n, a), b in zip(trainable(wrapped).items(), trainable(plain).values()):
        assert torch.equal(a, b), n
