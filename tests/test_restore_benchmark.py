"""benchmarks/restore.py's restore prompt sets: the testbed's own files, and the same prompts rewritten."""

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from curvsafe.data import Pair, load_pairs
from curvsafe.testbed.corpus import World
from curvsafe.testbed.stages import QUICK, _write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("restore_benchmark", ROOT / "benchmarks" / "restore.py")
    module = importlib.util.module_from_spec(spec)
    path = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path  # the benchmark trims sys.path for itself
    return module


def _testbed_files(tmp_path: Path, cfg) -> Path:
    """Restore files as the testbed writes them: ``restore_safety`` training-template prompts of each kind."""
    tmp_path.mkdir()
    world = World(cfg.seed)
    harmful = world.harmful("train")[::7][:cfg.restore_safety]
    benign = world.benign_requests("train")[::5][:cfg.restore_safety]
    _write_jsonl(tmp_path / "restore_harmful.jsonl", [world.comply(e) for e in harmful])
    _write_jsonl(tmp_path / "restore_benign.jsonl", [Pair(e.prompt, "") for e in benign])
    return tmp_path


def test_noisy_restore_prompts_rewrite_the_testbeds_own(bench, tmp_path):
    cfg = replace(QUICK, seed=3)
    data = _testbed_files(tmp_path / "data", cfg)
    work = tmp_path / "work"
    work.mkdir()
    plain = bench.restore_prompt_files(cfg, data, work, cfg.restore_safety, "none")
    assert plain == (data / "restore_harmful.jsonl", data / "restore_benign.jsonl")
    noisy = bench.restore_prompt_files(cfg, data, work, cfg.restore_safety, "noisy")
    again = bench.restore_prompt_files(cfg, data, tmp_path, cfg.restore_safety, "noisy")
    actions = {e.prompt: e.action for e in World(cfg.seed).harmful("train") + World(cfg.seed).benign_requests("train")}
    for before, after, repeat in zip(plain, noisy, again):
        old = load_pairs(before, require_response=False)
        new = load_pairs(after, require_response=False)
        assert len(new) == len(old) == cfg.restore_safety
        assert [p.prompt for p in new] == [p.prompt for p in load_pairs(repeat, require_response=False)]
        assert sum(a.prompt != b.prompt for a, b in zip(old, new)) >= len(old) // 3  # most are rewritten
        for a, b in zip(old, new):  # every rewrite still asks for the same action (noise may fall inside it)
            words = iter(b.prompt.split())
            assert all(w in words for w in actions[a.prompt].split()), (a.prompt, b.prompt)
    held_out = {e.prompt for e in World(cfg.seed).harmful("heldout")}
    assert not held_out & {p.prompt for p in load_pairs(noisy[0])}
    with pytest.raises(ValueError, match="augmentation"):
        bench.restore_prompt_files(cfg, data, work, cfg.restore_safety, "shuffled")


def test_dampings_run_the_damped_back_ends_once_each_and_label_their_rows(bench, capsys):
    runs = bench.runs(["lbfgs", "kfac", "sgd", "safelora"], [0, 1], [0.1, 1.0])
    assert runs == [("lbfgs", 0, 0.1), ("lbfgs", 0, 1.0), ("kfac", 0, 0.1), ("kfac", 0, 1.0), ("kfac", 1, 0.1),
                    ("kfac", 1, 1.0), ("sgd", 0, bench.DEFAULT_DAMPING), ("safelora", 0, bench.DEFAULT_DAMPING)]
    # without --dampings nothing changes: one run per method (and curvature seed) at the default damping
    assert bench.runs(["cg", "sgd"], [0], [bench.DEFAULT_DAMPING]) == [("cg", 0, 0.1), ("sgd", 0, 0.1)]

    ref = {"harmful_rate": 0.0, "over_refusal": 0.0, "task_accuracy": 0.9}
    references = {0: {"aligned": ref, "attacked": {**ref, "harmful_rate": 1.0}}}
    row = {"seed": 0, "objective": "anchor", "method": "kfac", "curvature_seed": 0, "prompts": 48,
           "augmentation": "none", "iterations": 3, "iteration_vs_train_step": 4.0, "stopped": "cap"}
    rows = [{**row, "damping": 1.0, "harmful_rate": 0.2, "over_refusal": 0.0, "task_accuracy": 0.9},
            {**row, "damping": 0.1, "harmful_rate": 0.0, "over_refusal": 0.0, "task_accuracy": 0.9},
            {**row, "damping": 0.03, "harmful_rate": 0.0, "over_refusal": 0.5, "task_accuracy": 0.9}]
    assert [bench._prompt_set(r) for r in rows] == ["48 λ=1", "48", "48 λ=0.03"]
    assert bench._prompt_sets(rows) == ["48 λ=0.03", "48", "48 λ=1"]  # by damping
    text = "\n".join(bench.tables(references, rows, ["anchor"], ["kfac"], [0]))
    summary = [line for line in text.splitlines() if line.startswith("| anchor | kfac |")]
    assert [line.split(" | ")[2] for line in summary] == ["48 λ=0.03", "48", "48 λ=1"]
    assert [line.split(" | ")[-2] for line in summary] == ["0 / 1", "1 / 1", "0 / 1"]  # each damping's own verdict
    assert "--dampings must be > 0" in _refused(bench, capsys, ["--dampings", "0.1,0"])


def test_task_budgets_and_floors_label_their_rows_and_are_checked(bench, capsys):
    ref = {"harmful_rate": 0.0, "over_refusal": 0.0, "task_accuracy": 0.9}
    references = {0: {"aligned": ref, "attacked": {**ref, "harmful_rate": 1.0}}}
    row = {"seed": 0, "objective": "anchor", "method": "sgd", "curvature_seed": 0, "prompts": 48, "damping": 0.1,
           "augmentation": "none", "iterations": 3, "iteration_vs_train_step": 4.0, "stopped": "cap"}
    rows = [{**row, "task_budget": 0.04, "harmful_rate": 0.02, "over_refusal": 0.0, "task_accuracy": 0.8},
            {**row, "task_budget": bench.DEFAULT_BUDGET, "harmful_rate": 0.3, "over_refusal": 0.0,
             "task_accuracy": 0.9},
            {**row, "task_budget": 0.01, "harmful_rate": 0.6, "over_refusal": 0.0, "task_accuracy": 0.9},
            {**row, "task_budget_abs": 0.02, "harmful_rate": 0.1, "over_refusal": 0.0, "task_accuracy": 0.85}]
    assert [bench._prompt_set(r) for r in rows] == ["48 budget 4%", "48", "48 budget 1%", "48 floor 0.02"]
    assert bench._prompt_sets(rows) == ["48 budget 1%", "48", "48 floor 0.02", "48 budget 4%"]  # budget, floor
    text = "\n".join(bench.tables(references, rows, ["anchor"], ["sgd"], [0]))
    summary = [line for line in text.splitlines() if line.startswith("| anchor | sgd |")]
    assert [line.split(" | ")[3] for line in summary] == ["60.0", "30.0", "10.0", "2.0"]  # each setting's own rows
    assert "--task-budgets must be > 0" in _refused(bench, capsys, ["--task-budgets", "0.02,-1"])
    assert "--task-budget-floors >= 0" in _refused(bench, capsys, ["--task-budget-floors", "-0.01"])


def test_curvature_batches_label_their_rows_and_are_checked(bench, capsys):
    row = {"seed": 0, "objective": "anchor", "method": "kfac", "curvature_seed": 0, "prompts": 48, "damping": 0.1}
    rows = [{**row, "curvature_batches": 4}, {**row, "curvature_batches": None}, {**row, "curvature_batches": 2}]
    assert [bench._prompt_set(r) for r in rows] == ["48 curvature on 4 batches", "48", "48 curvature on 2 batches"]
    assert bench._prompt_sets(rows) == ["48", "48 curvature on 2 batches", "48 curvature on 4 batches"]  # all first
    assert "--curvature-batches takes all" in _refused(bench, capsys, ["--curvature-batches", "all,some"])
    assert "counts must be >= 1" in _refused(bench, capsys, ["--curvature-batches", "0"])


def _refused(bench, capsys, argv: list[str]) -> str:
    """The benchmark's error for ``argv``: it must exit before any run."""
    sys.argv, saved = ["restore.py", *argv], sys.argv
    try:
        with pytest.raises(SystemExit):
            bench.main()
    finally:
        sys.argv = saved
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--testbed", "realistic"], "goes with --data-dir"),
    (["--data-dir", "somewhere"], "goes with --data-dir"),
    (["--testbed", "realistic", "--data-dir", "somewhere", "--augmentations", "none,noisy"], "its own restore files"),
    (["--testbed", "realistic", "--data-dir", "somewhere", "--restore-prompts", "144"], "its own restore files"),
])
def test_realistic_testbed_options_are_checked_before_any_run(bench, capsys, argv, message):
    assert message in _refused(bench, capsys, argv)
