"""Restoration (``restoration/api.py``, ``restoration/run.py``): end-to-end restore for every method, outputs, bad
input."""

import shutil

import pytest
import torch
from conftest import restore_files

from curvsafe.data import DataError
from curvsafe.restoration import NoProgressError, StopReason, run_restore
from curvsafe.testbed.corpus import World
from curvsafe.testbed.model import ModelConfig, build_model, build_tokenizer

@pytest.mark.parametrize("method", ["lbfgs", "cg"])
def test_ggn_row_chunks_restore_like_whole_batches(setup, tmp_path, method, monkeypatch):
    """``ggn_rows`` bounds the GGN products' memory: the same products, so the same accepted steps. Without it
    the task batches are merged into passes of up to ``batch_size`` x ``max_length`` tokens; with it, passes of
    ``ggn_rows`` rows of up to ``max_length`` tokens."""
    import sys

    hvp_module = sys.modules["curvsafe.curvature.hvp"]
    limits, passes = set(), hvp_module._passes

    def recorded(data, device, loss, max_rows, max_tokens):
        limits.add((max_rows, max_tokens))
        return passes(data, device, loss, max_rows, max_tokens)

    monkeypatch.setattr(hvp_module, "_passes", recorded)
    whole = restore_files(setup, tmp_path / "whole", method, iterations=2).report
    assert limits == {(None, 16 * 128)}
    limits.clear()
    chunked = restore_files(setup, tmp_path / "chunked", method, iterations=2, ggn_rows=3).report
    assert limits == {(3, 3 * 128)}
    assert chunked["config"]["ggn_rows"] == 3 and chunked["iterations"] == whole["iterations"]
    assert chunked["safety_objective"]["after"] == pytest.approx(whole["safety_objective"]["after"], rel=1e-4)
    assert chunked["plan"]["peak_bytes"] < whole["plan"]["peak_bytes"]
    # a budget the whole-batch products exceed: restore picks a row chunk that fits instead of refusing
    budget = (chunked["plan"]["peak_bytes"] + whole["plan"]["peak_bytes"]) // 2
    fitted = restore_files(setup, tmp_path / "fitted", method, iterations=2, max_memory=budget).report
    assert fitted["config"]["ggn_rows"] is not None and fitted["plan"]["peak_bytes"] <= budget
    assert fitted["iterations"] == whole["iterations"]


def test_ggn_passes_hold_a_batch_at_full_length():
    """restore merges lbfgs / cg task batches of short sequences into GGN passes of up to a batch at
    ``max_length`` (what the plan prices), of ``ggn_rows`` rows when given; under FSDP2 one pass per batch."""
    from curvsafe.config import RestoreConfig

    assert RestoreConfig().ggn_tokens() == 16 * 128
    assert RestoreConfig(batch_size=4, max_length=32, ggn_rows=64).ggn_tokens() == 64 * 32
    assert RestoreConfig(fsdp2=True).ggn_tokens() is None


def test_restore_merges_the_losses_batches_into_passes_of_a_batch_at_full_length(setup, tmp_path, monkeypatch):
    """The task loss, S and the benign constraint run in passes of up to ``batch_size x max_length`` tokens (their
    values and gradients: a training step's activations per pass); under FSDP2 one pass per batch."""
    import sys

    from curvsafe.config import RestoreConfig

    assert RestoreConfig().loss_tokens() == 16 * 128
    assert RestoreConfig(batch_size=4, max_length=32, ggn_rows=64).loss_tokens() == 4 * 32
    assert RestoreConfig(fsdp2=True).loss_tokens() is None
    api = sys.modules["curvsafe.restoration.api"]
    limits = set()
    for name in ("objective_values", "objective_gradients"):
        def recorded(*args, original=getattr(api, name), **kwargs):
            limits.add(kwargs["max_tokens"])
            return original(*args, **kwargs)
        monkeypatch.setattr(api, name, recorded)
    report = restore_files(setup, tmp_path / "out", "kfac", iterations=1, batch_size=4, max_length=64).report
    assert limits == {4 * 64} and report["iterations"] == 1


def test_curvature_subset_is_evenly_spaced():
    from curvsafe.restoration.api import curvature_subset

    assert curvature_subset(list(range(10)), 4) == [0, 2, 5, 7]
    assert curvature_subset(range(3), None) == curvature_subset(range(3), 3) == [0, 1, 2]
    assert curvature_subset(range(3), 9) == [0, 1, 2]
    assert curvature_subset(range(3), 1) == [0]
    with pytest.raises(ValueError, match="curvature_batches"):
        curvature_subset(range(3), 0)


def test_every_numeric_restore_setting_parses_as_a_number():
    """``curvsafe restore``'s options are RestoreConfig's fields: a numeric one must not arrive as a string."""
    import argparse
    import typing

    from curvsafe.cli import _restore_settings, build_parser
    from curvsafe.config import RestoreConfig

    options = argparse.ArgumentParser()
    _restore_settings(options)
    actions = {a.dest: a for a in options._actions}
    numeric = {n for n, hint in typing.get_type_hints(RestoreConfig).items()
               if hint in (int, float, typing.Optional[int], typing.Optional[float])}
    assert "curvature_batches" in numeric and {n for n in numeric if actions[n].type is None} == set()
    args = build_parser().parse_args(["restore", "--model", "m", "--adapter", "a", "--harmful", "h", "--task", "t",
                                      "--out", "o", "--curvature-batches", "2"])
    assert args.curvature_batches == 2


@pytest.mark.parametrize("method", ["kfac", "lbfgs"])
def test_curvature_batches_fit_the_curvature_on_a_subset(setup, tmp_path, monkeypatch, method):
    """``curvature_batches`` changes the batches of every curvature fit and nothing else: at least as many as the
    task has is the default run bit for bit; one batch fits the curvature on one (the task loss still on all 3) and
    the plan prices it."""
    import curvsafe.restoration.preconditioners as P

    seen = []
    cls = {"kfac": P.KFACPreconditioner, "lbfgs": P.LBFGSPreconditioner}[method]
    original = cls.refresh
    monkeypatch.setattr(cls, "refresh", lambda self, model, batches, *a: (seen.append(len(batches)),
                                                                         original(self, model, batches, *a))[1])
    default = restore_files(setup, tmp_path / "all", method, iterations=2).report
    every = restore_files(setup, tmp_path / "every", method, iterations=2, curvature_batches=3).report
    assert set(seen) == {3} and every["config"]["curvature_batches"] == 3
    assert every["safety_objective"] == default["safety_objective"] and every["task_nll"] == default["task_nll"]
    seen.clear()
    one = restore_files(setup, tmp_path / "one", method, iterations=2, curvature_batches=1).report
    assert set(seen) == {1} and one["iterations"] >= 1
    assert one["safety_objective"]["after"] < one["safety_objective"]["before"]
    assert one["task_nll"]["after"] <= one["task_nll"]["budget"]
    assert one["plan"]["steps_per_iteration"] < default["plan"]["steps_per_iteration"]
    with pytest.raises(ValueError, match="curvature_batches"):
        restore_files(setup, tmp_path / "zero", method, curvature_batches=0)


@pytest.mark.parametrize("method", ["lbfgs", "kfac", "ekfac", "cg", "sgd"])
def test_every_method_lowers_safety_within_budget(setup, tmp_path, method):
    report = restore_files(setup, tmp_path / method, method).report
    assert report["safety_objective"]["after"] < report["safety_objective"]["before"]
    assert report["task_nll"]["after"] <= report["task_nll"]["budget"] + 1e-9
    assert report["iterations"] == len(report["steps"]) >= 1 and report["seconds"] > 0
    assert report["anchor_nll"]["after"] < report["anchor_nll"]["before"]  # the anchor objective is its NLL
    for step in report["steps"]:
        assert step["task_nll"] <= report["task_nll"]["budget"] + 1e-9  # every accepted step inside the budget
        assert set(step["predicted"]) == {"safety", "task"} and set(step["realised"]) == {"safety", "task"}
    assert report["layer_update_norms"] and all(v >= 0 for v in report["layer_update_norms"].values())
    assert (tmp_path / method / "anchor.jsonl").is_file()


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_restore_takes_the_memory_bound_of_its_settings(setup, tmp_path, monkeypatch, method):
    """``max_dense_dim``, ``rank`` and ``sketch_passes`` reach the task curvature's K-FAC (the tiny model's factors
    are sketched with a narrow sketch: oversample and probes 2, patched in) and the restore still descends."""
    from curvsafe.config import RestoreConfig
    from curvsafe.curvature import KFAC
    from curvsafe.curvature.lowrank import LowRank, SketchedFactor

    assert RestoreConfig(rank=8, max_dense_dim=100, sketch_passes=2).low_rank() == LowRank(100, 8, passes=2)
    for bad in ({"rank": 0}, {"max_dense_dim": 0}, {"sketch_passes": 3}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RestoreConfig(**bad)
    monkeypatch.setattr(RestoreConfig, "low_rank", lambda c: LowRank(c.max_dense_dim, c.rank, oversample=2, probes=2,
                                                                     passes=c.sketch_passes))
    seen = []
    decompose = KFAC._all_eigen

    def spy(self):  # the factors as the decomposition finds them (it frees them: keep_factors=False)
        seen.append([f.refined for b in self.factors.values() for f in (b.A, b.G) if isinstance(f, SketchedFactor)])
        assert not self.keep_factors
        return decompose(self)

    monkeypatch.setattr(KFAC, "_all_eigen", spy)
    report = restore_files(setup, tmp_path / method, method, max_dense_dim=16, rank=4, sketch_passes=2).report
    assert seen and all(refined and all(refined) for refined in seen)  # sketched, and each refined by a 2nd pass
    assert report["config"]["rank"] == 4 and report["config"]["sketch_passes"] == 2
    assert report["safety_objective"]["after"] < report["safety_objective"]["before"]
    assert report["task_nll"]["after"] <= report["task_nll"]["budget"] + 1e-9


def test_saved_adapter_reloads_bit_identical_and_input_untouched(setup, tmp_path):
    from curvsafe.models import load_model

    before = (setup / "adapter" / "adapter_model.safetensors").read_bytes()
    result = restore_files(setup, tmp_path / "out")
    assert (setup / "adapter" / "adapter_model.safetensors").read_bytes() == before
    reloaded, _ = load_model(setup / "aligned", tmp_path / "out" / "adapter")
    live = {n: p for n, p in result.model.named_parameters() if "lora_" in n}
    saved = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    assert live and set(live) == set(saved)
    assert all(torch.equal(live[n], saved[n]) for n in live)


def test_existing_out_refused_and_failure_leaves_nothing(setup, tmp_path, monkeypatch):
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(FileExistsError):
        restore_files(setup, out)
    import curvsafe.restoration.run as run_module

    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(run_module, "restore", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        restore_files(setup, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_budget_no_step_can_meet(setup, tmp_path, monkeypatch):
    """A task loss that is minus the safety loss: every step that lowers S raises L, so with a zero budget no
    step is acceptable; the API reports it, the command fails and writes nothing."""
    import curvsafe.restoration.run as run_module
    from curvsafe.data import load_pairs
    from curvsafe.models import load_model
    from curvsafe.objectives import LossTerm, Objective, build_safety
    from curvsafe.restoration import restore

    model, tok = load_model(setup / "aligned", setup / "adapter", trainable_adapter=True)
    pairs = load_pairs(setup / "harmful.jsonl")
    safety, _ = build_safety(model, tok, pairs, "refusal")
    opposite = Objective([LossTerm("task", safety.terms[0].batches, sign=-1.0)])
    result = restore(model, safety, opposite, method="sgd", task_budget=0.0, task_budget_abs=0.0, iterations=2,
                     progress=False)
    assert result.iterations == 0 and result.stopped == StopReason.BUDGET
    assert result.safety_objective["after"] == result.safety_objective["before"]

    monkeypatch.setattr(run_module, "restore", lambda *a, **k: result)
    with pytest.raises(NoProgressError, match="budget"):
        restore_files(setup, tmp_path / "tight", "sgd")
    assert not (tmp_path / "tight").exists()


def test_bad_inputs_are_clear_errors(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": 3}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        run_restore(setup / "aligned", setup / "adapter", setup / "harmful.jsonl", bad, tmp_path / "o1")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no examples"):
        run_restore(setup / "aligned", setup / "adapter", empty, setup / "task.jsonl", tmp_path / "o2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config"):
        run_restore(setup / "aligned", tmp_path / "empty", setup / "harmful.jsonl", setup / "task.jsonl",
                    tmp_path / "o3")
    # an adapter trained on a differently sized base does not match
    other = tmp_path / "other"
    tok = build_tokenizer(World(0).words)
    build_model(tok, ModelConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
                seed=0).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match="does not match"):
        run_restore(other, setup / "adapter", setup / "harmful.jsonl", setup / "task.jsonl", tmp_path / "o4")
    with pytest.raises(ValueError, match="unaligned"):
        run_restore(setup / "aligned", setup / "adapter", setup / "harmful.jsonl", setup / "task.jsonl",
                    tmp_path / "o5", method="safelora")
    for name in ("o1", "o2", "o3", "o4", "o5"):
        assert not (tmp_path / name).exists()


def test_non_finite_losses_are_refused(setup, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(setup / "adapter", broken)
    from safetensors.torch import load_file, save_file

    weights = load_file(broken / "adapter_model.safetensors")
    first = next(k for k in weights if "lora_B" in k)
    weights[first] = torch.full_like(weights[first], float("nan"))
    save_file(weights, broken / "adapter_model.safetensors")
    with pytest.raises(FloatingPointError):
        run_restore(setup / "aligned", broken, setup / "harmful.jsonl", setup / "task.jsonl", tmp_path / "o",
                    progress=False)
    assert not (tmp_path / "o").exists()


def test_select_top_reports_influence(setup, tmp_path):
    report = restore_files(setup, tmp_path / "top", "kfac", select_top=4).report
    assert len(report["influence"]) == 12 and all("score" in s for s in report["influence"])


def test_full_fine_tune_restore(setup, tmp_path):
    """No adapter: the fine-tuned model is a full model, --params picks the weights, --aligned-model the anchor."""
    from curvsafe.data import load_pairs
    from curvsafe.models import load_model
    from curvsafe.testbed.train import sft

    model, tok = load_model(setup / "aligned")
    sft(model, tok, load_pairs(setup / "task.jsonl"), epochs=3, lr=3e-3, batch_size=16, progress=False)
    model.save_pretrained(tmp_path / "ft")
    tok.save_pretrained(tmp_path / "ft")
    with pytest.raises(ValueError, match="--params"):
        run_restore(tmp_path / "ft", None, setup / "harmful.jsonl", setup / "task.jsonl", tmp_path / "o1")
    with pytest.raises(ValueError, match="--aligned-model"):
        run_restore(tmp_path / "ft", None, setup / "harmful.jsonl", setup / "task.jsonl", tmp_path / "o2",
                    params=["*.mlp.down_proj.weight"])
    run = run_restore(tmp_path / "ft", None, setup / "harmful.jsonl", setup / "task.jsonl", tmp_path / "out",
                      method="kfac", params=["*.mlp.down_proj.weight", "*.self_attn.o_proj.weight"],
                      aligned_model=setup / "aligned", iterations=3, progress=False)
    report = run.report
    assert report["safety_objective"]["after"] < report["safety_objective"]["before"]
    assert report["task_nll"]["after"] <= report["task_nll"]["budget"] + 1e-9
    assert set(report["layer_update_norms"]) <= {"model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj"}
    reloaded, _ = load_model(tmp_path / "out" / "model")
    assert torch.equal(reloaded.model.layers[0].mlp.down_proj.weight, run.model.model.layers[0].mlp.down_proj.weight)
    # the default back-end (kfac) covers linear blocks only: a norm's weight is refused, naming the methods that
    # cover it, and nothing is written; lbfgs restores it
    norm = ["*.layers.0.input_layernorm.weight"]
    with pytest.raises(ValueError, match="method lbfgs or cg"):
        run_restore(tmp_path / "ft", None, setup / "harmful.jsonl", setup / "task.jsonl", tmp_path / "o3",
                    params=norm, aligned_model=setup / "aligned", iterations=1, progress=False)
    by_lbfgs = run_restore(tmp_path / "ft", None, setup / "harmful.jsonl", setup / "task.jsonl", tmp_path / "o4",
                           method="lbfgs", params=norm, aligned_model=setup / "aligned", iterations=1,
                           progress=False).report
    assert by_lbfgs["safety_objective"]["after"] < by_lbfgs["safety_objective"]["before"]
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def _tiny_restore_problem(setup):
    from curvsafe.data import load_pairs, make_batches
    from curvsafe.models import load_model
    from curvsafe.objectives import LossTerm, Objective, build_safety

    model, tok = load_model(setup / "aligned", setup / "adapter", trainable_adapter=True)
    safety, _ = build_safety(model, tok, load_pairs(setup / "harmful.jsonl"), "refusal")
    task = Objective([LossTerm("task", make_batches(tok, load_pairs(setup / "task.jsonl"), batch_size=16))])
    return model, safety, task


def test_mu_stays_zero_when_only_the_safety_curvature_makes_steps_backtrack(setup):
    """A budget nothing can break: the long trial steps overshoot S and are backtracked, and the task-descent
    weight μ must not grow for that (it frees budget, and here no budget binds)."""
    from curvsafe.restoration import restore

    model, safety, task = _tiny_restore_problem(setup)
    norm0 = float(torch.sqrt(sum((p.detach() ** 2).sum() for p in model.parameters() if p.requires_grad)))
    result = restore(model, safety, task, method="sgd", task_budget=1e6, iterations=3, trust_radius=20.0,
                     progress=False)
    assert result.iterations == 3
    assert any(step["step_norm"] < 20.0 * norm0 / 3 for step in result.steps)  # steps were backtracked
    assert all(step["mu"] == 0.0 for step in result.steps)


def test_mu_returns_to_zero_when_the_task_term_stalls_the_safety_descent(setup, monkeypatch):
    """Scripted line searches: the first lowers S but breaks the budget (μ grows), the second lowers nothing
    with μ > 0 (μ returns to 0, so the third searches the pure safety direction again)."""
    import curvsafe.restoration.api as api

    model, safety, task = _tiny_restore_problem(setup)
    real, directions = api._backtrack, []

    def scripted(model, chosen, d, *args, **kwargs):
        directions.append({n: v.clone() for n, v in d.items()})
        if len(directions) == 1:
            return api._Trial(None, True, False, {"task loss"})
        if len(directions) == 2:
            return api._Trial(None, False, True, set())
        return real(model, chosen, d, *args, **kwargs)

    monkeypatch.setattr(api, "_backtrack", scripted)
    result = api.restore(model, safety, task, method="sgd", task_budget=1e6, iterations=1,
                         progress=False)
    assert result.iterations == 1 and len(directions) == 3
    assert not all(torch.equal(directions[0][n], directions[1][n]) for n in directions[0])  # μ > 0
    assert all(torch.equal(directions[0][n], directions[2][n]) for n in directions[0])  # μ back at 0
