"""Reliability of restore / eval / factors / analyze: nothing lost, inputs never touched, truthful reports, clear
one-line errors. One test (or a few) per defect of the reliability issue; subprocess fault injection is in
test_faults.py."""

import json
import os
import shutil

import pytest
import torch
from conftest import tiny_config

from curvsafe.cli import main
from curvsafe.data import DataError, Pair, load_pairs, make_batches
from curvsafe.eval import JudgeError, judge_responses, load_judge
from curvsafe.io import OutputError, check_out, commit, staged_dir
from curvsafe.models import ModelLoadError, load_model
from curvsafe.nll import token_mean_nll
from curvsafe.objectives import LossTerm, Objective, build_safety
from curvsafe.restoration import NoProgressError, StopReason, restore, run_restore
from curvsafe.testbed.corpus import World
from curvsafe.testbed.model import ModelConfig, build_model, build_tokenizer


def tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def error_lines(err):
    """The lines of ``err`` that are curvsafe's own messages (progress bars of other libraries, warnings and
    restore's memory plan aside)."""
    return [line for line in err.splitlines() if line.startswith("curvsafe ") and ": warning:" not in line
            and "estimated curvature" not in line]


def restore_args(setup, out, *extra):  # noqa: F811
    return ["restore", "--model", str(setup / "aligned"), "--adapter", str(setup / "adapter"), "--harmful",
            str(setup / "harmful.jsonl"), "--task", str(setup / "task.jsonl"), "--out", str(out), *extra]


def harmful_setup(setup, ceiling_gap):  # noqa: F811
    """The fine-tuned model, its task objective, and a ``harmful`` safety objective whose ceiling (the NLL at
    which the term goes flat) is ``ceiling_gap`` above the current harmful NLL."""
    model, tok = load_model(setup / "aligned", setup / "adapter", trainable_adapter=True)
    pairs = load_pairs(setup / "harmful.jsonl")
    current = float(token_mean_nll(model, make_batches(tok, pairs, batch_size=16, max_length=64)))
    safety, _ = build_safety(model, tok, pairs, "harmful", max_length=64,
                             aligned_nll=lambda batches: current + ceiling_gap)
    task = Objective([LossTerm("task", make_batches(tok, load_pairs(setup / "task.jsonl"), batch_size=16,
                                                    max_length=64))])
    return model, safety, task, current + ceiling_gap


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


# ---------------------------------------------------------------- 1. a run that made progress keeps it
@pytest.mark.parametrize("method", ["lbfgs", "sgd"])
def test_vanished_safety_gradient_is_a_stop_reason(setup, method):  # noqa: F811
    """Before: the L-BFGS refresh after the harmful term reached its ceiling raised 'the task GGN gave no usable
    curvature pair' and the accepted step was lost. Without a target, the flat objective is now a stop reason."""
    model, safety, task, ceiling = harmful_setup(setup, 0.05)
    result = restore(model, safety, task, method=method, iterations=6, task_budget=1.0, progress=False)
    assert result.iterations >= 1 and result.stopped == StopReason.FLAT, result.stop_detail
    assert result.safety_objective["after"] == pytest.approx(-ceiling)
    assert result.error is None


def test_exception_after_an_accepted_step_keeps_the_last_accepted_state(setup, monkeypatch):  # noqa: F811
    import sys

    api = sys.modules["curvsafe.restoration.api"]
    model, safety, task, _ = harmful_setup(setup, 5.0)
    accepted = []
    original = api.objective_gradients

    def failing_gradients(*args, **kwargs):
        if accepted:  # the first gradients after an accepted step fail
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(api, "objective_gradients", failing_gradients)
    result = restore(model, safety, task, method="sgd", iterations=5, task_budget=1.0, progress=False,
                     callback=lambda entry: accepted.append(lora_state(model)))
    assert result.stopped == StopReason.ERROR and "injected failure" in result.error
    assert result.iterations == 1 == len(accepted)
    now = lora_state(model)
    assert all(torch.equal(now[n], accepted[0][n]) for n in now)  # the parameters of the accepted step
    assert result.safety_objective["after"] == pytest.approx(safety.evaluate(model))


def test_exception_before_any_accepted_step_propagates_with_parameters_untouched(setup, monkeypatch):  # noqa: F811
    import sys

    api = sys.modules["curvsafe.restoration.api"]
    model, safety, task, _ = harmful_setup(setup, 5.0)
    before = lora_state(model)
    original = api.objective_values
    calls = {"n": 0}

    def failing_values(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:  # the start-up evaluation passes, the first trial step fails
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(api, "objective_values", failing_values)
    with pytest.raises(RuntimeError, match="injected"):
        restore(model, safety, task, method="sgd", iterations=3, progress=False)
    now = lora_state(model)
    assert all(torch.equal(now[n], before[n]) for n in now)


def test_run_restore_writes_the_partial_result_and_the_cli_exits_3(setup, tmp_path, monkeypatch, capsys):  # noqa: F811
    import sys

    import curvsafe.restoration.run as run_module

    api = sys.modules["curvsafe.restoration.api"]
    original, gradients = run_module.restore, api.objective_gradients

    def restore_then_fail(*args, **kwargs):
        done = []
        kwargs["callback"] = done.append

        def failing_gradients(*a, **kw):
            if done:
                raise RuntimeError("injected failure")
            return gradients(*a, **kw)

        monkeypatch.setattr(api, "objective_gradients", failing_gradients)
        return original(*args, **kwargs)

    monkeypatch.setattr(run_module, "restore", restore_then_fail)
    out = tmp_path / "partial"
    assert main(restore_args(setup, out, "--method", "sgd", "--task-budget", "1")) == 3
    err = capsys.readouterr().err
    assert "injected failure" in err and "last accepted state was written" in err
    report = json.loads((out / "report.json").read_text())
    assert report["stopped"] == "error" and "injected failure" in report["error"] and report["iterations"] == 1
    reloaded, tok = load_model(setup / "aligned", out / "adapter")
    safety, _ = build_safety(reloaded, tok, [], "anchor", anchor=load_pairs(out / "anchor.jsonl"), max_length=64)
    assert safety.evaluate(reloaded) == pytest.approx(report["anchor_nll"]["after"], rel=1e-5)
    assert report["anchor_nll"]["after"] < report["anchor_nll"]["before"]


# ---------------------------------------------------------------- 2. --out never replaces or enters an input
@pytest.mark.parametrize("where", ["adapter", "inside", "parent"])
def test_out_overlapping_an_input_is_refused_even_with_force(setup, tmp_path, where, capsys):  # noqa: F811
    """Before: `--out` equal to the adapter with --force deleted the input adapter."""
    copy = tmp_path / "work"
    shutil.copytree(setup, copy, ignore=shutil.ignore_patterns("*.tmp-*"))
    before = tree_bytes(copy)
    out = {"adapter": copy / "adapter", "inside": copy / "adapter" / "restored", "parent": copy}[where]
    assert main(restore_args(copy, out, "--force")) == 2
    err = capsys.readouterr().err
    assert "the input" in err and len(error_lines(err)) == 1
    assert tree_bytes(copy) == before


def test_check_out_rules(tmp_path):
    (tmp_path / "data.jsonl").write_text("x")
    with pytest.raises(OutputError, match="is the input"):
        check_out(tmp_path / "data.jsonl", True, [tmp_path / "data.jsonl"])
    with pytest.raises(FileExistsError, match="--force"):
        check_out(tmp_path / "data.jsonl", False, [])
    assert check_out(tmp_path / "new" / "out", False, [tmp_path / "data.jsonl", None]) == tmp_path / "new" / "out"
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputError, match="cannot write"):
        check_out(blocker / "out.json", False, [])


# ---------------------------------------------------------------- 3. report fields say what they hold
def test_report_fields_hold_their_plain_quantities(setup, tmp_path):  # noqa: F811
    """Before: `harmful_loss` held -min(NLL, ceiling) for --objective harmful, the anchor NLL under anchor, and
    `refusal_loss` was an alias."""
    harm = run_restore(setup / "aligned", setup / "adapter", setup / "harmful.jsonl", setup / "task.jsonl",
                       tmp_path / "h", method="sgd", objective="harmful", task_budget=1.0, iterations=3,
                       progress=False)
    r = harm.report
    assert "harmful_loss" not in r and "refusal_loss" not in r
    assert r["harmful_nll"]["after"] > r["harmful_nll"]["before"]  # raised: the objective is minus it
    assert r["safety_objective"]["before"] == pytest.approx(-r["harmful_nll"]["before"], rel=1e-6)
    assert r["safety_objective"]["after"] < r["safety_objective"]["before"]
    assert r["iterations"] == len(r["steps"])
    anchor = run_restore(setup / "aligned", setup / "adapter", setup / "harmful.jsonl", setup / "task.jsonl",
                         tmp_path / "a", method="kfac", iterations=2, task_budget=1.0, progress=False).report
    assert anchor["anchor_nll"]["before"] == pytest.approx(anchor["safety_objective"]["before"], rel=1e-6)
    assert anchor["anchor_nll"]["after"] == pytest.approx(anchor["safety_objective"]["after"], rel=1e-6)
    assert anchor["harmful_nll"]["before"] > 0  # shown beside the objective: the file has harmful responses
    assert anchor["task_nll"]["after"] <= anchor["task_nll"]["budget"]


def test_readme_documents_the_report_fields():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for field in ("safety_objective", "harmful_nll", "anchor_nll", "refusal_nll", "task_nll", "stopped",
                  "stop_detail", "iterations", "steps", "error"):
        assert f"`{field}`" in readme, field


# ---------------------------------------------------------------- 4. stop reasons that are true
def test_target_reached_on_the_last_step_is_reported_as_such(setup):  # noqa: F811
    """Before: 'iterations' when the last allowed step reached the target, and 'task budget binds' when the
    harmful term had hit its ceiling far inside the budget."""
    model, safety, task, ceiling = harmful_setup(setup, 0.05)
    result = restore(model, safety, task, method="sgd", iterations=1, task_budget=1.0, safety_target=-ceiling,
                     progress=False)
    assert result.iterations == 1 and result.stopped == StopReason.TARGET
    model, safety, task, ceiling = harmful_setup(setup, 0.05)
    result = restore(model, safety, task, method="sgd", iterations=5, task_budget=1.0, safety_target=-ceiling,
                     progress=False)
    assert result.stopped == StopReason.TARGET and result.task_nll["after"] < result.task_nll["budget"]


def test_already_at_the_target_writes_the_input_unchanged(setup, tmp_path):  # noqa: F811
    """Before: a model already at the aligned level ended with 'no step lowered the safety loss ... loosen
    --task-budget'. A fresh adapter (B = 0) is the aligned model: nothing to restore, and the run says so."""
    from peft import LoraConfig, get_peft_model

    base, tok = load_model(setup / "aligned")
    get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])).save_pretrained(
        tmp_path / "fresh")
    for objective in ("harmful", "anchor"):
        run = run_restore(setup / "aligned", tmp_path / "fresh", setup / "harmful.jsonl", setup / "task.jsonl",
                          tmp_path / objective, method="lbfgs", objective=objective, progress=False)
        assert run.report["stopped"] == "target reached" and run.report["iterations"] == 0
        assert (tmp_path / objective / "adapter" / "adapter_model.safetensors").read_bytes() == \
            (tmp_path / "fresh" / "adapter_model.safetensors").read_bytes()


def test_a_baseline_that_does_not_lower_the_safety_objective_is_not_a_success(setup, tmp_path):  # noqa: F811
    """Before: resta reported success while the refusal loss rose. With the aligned model as its own
    'unaligned' model the safety vector is zero: nothing changes, and the run must say so."""
    with pytest.raises(NoProgressError, match="did not go down"):
        run_restore(setup / "aligned", setup / "adapter", setup / "harmful.jsonl", setup / "task.jsonl",
                    tmp_path / "resta", method="resta", unaligned_model=setup / "aligned", progress=False)
    assert not (tmp_path / "resta").exists()


def test_revert_moves_the_adapter(setup, tmp_path):  # noqa: F811
    """Before: revert bisected the wrong end and returned alpha = 1 (the fine-tune itself) every time."""
    report = run_restore(setup / "aligned", setup / "adapter", setup / "harmful.jsonl", setup / "task.jsonl",
                         tmp_path / "revert", method="revert", task_budget=100.0, progress=False).report
    assert report["details"]["alpha"] == 0.0 and report["stopped"] == "complete"


# ---------------------------------------------------------------- 5. judges
def test_judge_output_is_validated():
    prompts, responses = ["a", "b", "c", "d"], ["x", "y", "z", "w"]
    assert judge_responses(lambda p, r: [True, False, True, False], prompts, responses) == [True, False, True,
                                                                                          False]
    with pytest.raises(JudgeError, match="1 flags for 4 responses"):
        judge_responses(lambda p, r: [True], prompts, responses)
    with pytest.raises(JudgeError, match="expected bools"):
        judge_responses(lambda p, r: [0.9, 0.1, 0.2, 0.7], prompts, responses)
    with pytest.raises(JudgeError, match="ZeroDivisionError"):
        judge_responses(lambda p, r: 1 / 0, prompts, responses)
    with pytest.raises(JudgeError, match="expected a list of bools"):
        judge_responses(lambda p, r: "harmful", prompts, responses)


def test_judge_loading_failures_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "my_judges.py").write_text("flag = 3\n\nclass Broken:\n    def __init__(self):\n"
                                           "        raise OSError('no weights')\n")
    (tmp_path / "bad_import.py").write_text("import not_a_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec, needle in [("nope_module_xyz:judge", "cannot import"), ("my_judges:missing", "no attribute"),
                         ("my_judges:flag", "not a callable"), ("my_judges:Broken", "no weights"),
                         ("bad_import:judge", "not_a_module_xyz"), ("my_judges", "module:callable")]:
        with pytest.raises(JudgeError, match=needle) as info:
            load_judge(spec)
        assert "\n" not in str(info.value)


def test_eval_with_a_bad_judge_exits_2_before_any_work(setup, tmp_path, monkeypatch, capsys):  # noqa: F811
    (tmp_path / "short_judge.py").write_text("def judge(prompts, responses):\n    return [True]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["eval", "--model", str(setup / "aligned"), "--harmful", str(setup / "harmful.jsonl"), "--out",
            str(tmp_path / "e.json"), "--max-new-tokens", "2", "--limit", "4"]
    assert main(args + ["--judge", "short_judge:judge"]) == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "short_judge:judge returned 1 flags for 4 responses" in err
    assert not (tmp_path / "e.json").exists()
    assert main(args + ["--judge", "short_judge:nothing"]) == 2
    assert "no attribute" in capsys.readouterr().err


# ---------------------------------------------------------------- 6. files that cannot be read or written
def test_truncated_weights_are_one_line_errors(setup, tmp_path, capsys):  # noqa: F811
    """Before: SafetensorError tracebacks."""
    model = tmp_path / "model"
    shutil.copytree(setup / "aligned", model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])
    adapter = tmp_path / "adapter"
    shutil.copytree(setup / "adapter", adapter)
    (adapter / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes()[:500])
    with pytest.raises(ModelLoadError, match="cannot load the model"):
        load_model(model)
    with pytest.raises(ModelLoadError, match="cannot load the adapter"):
        load_model(setup / "aligned", adapter)
    for m, a in ((model, setup / "adapter"), (setup / "aligned", adapter)):
        assert main(["restore", "--model", str(m), "--adapter", str(a), "--harmful", str(setup / "harmful.jsonl"),
                     "--task", str(setup / "task.jsonl"), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert "SafetensorError" in err and len(error_lines(err)) == 1 and "Traceback" not in err


# ---------------------------------------------------------------- 7. messages
def test_data_file_messages(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:2: not UTF-8 text \(byte 0xe9\)"):
        load_pairs(latin)
    csv_file = tmp_path / "latin.csv"
    csv_file.write_bytes(b"goal,target\nx,y\nx\xff,y\n")
    with pytest.raises(DataError, match=r"latin.csv:3: not UTF-8"):
        load_pairs(csv_file)
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(DataError, match="is a folder"):
        load_pairs(tmp_path / "folder.jsonl")


def test_model_without_tokenizer_and_mismatched_adapter(setup, tmp_path):  # noqa: F811
    bare = tmp_path / "bare"
    shutil.copytree(setup / "aligned", bare)
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            f.unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer") as info:
        load_model(bare)
    assert "\n" not in str(info.value)
    other = tmp_path / "other"
    tok = build_tokenizer(World(0).words)
    build_model(tok, ModelConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
                seed=0).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(ModelLoadError, match=r"differ in shape, e\.g\. \S+: adapter \[\d+, 32\], model \[\d+, 16\]"):
        load_model(other, setup / "adapter")


def test_long_sequences_are_capped_and_counted(setup, tmp_path, caplog):  # noqa: F811
    model, tok = load_model(setup / "aligned")
    from curvsafe.models import fit_max_length

    assert fit_max_length(4096, model) == tiny_config().max_position_embeddings == 64
    assert fit_max_length(16, model) == 16
    long = Pair("what is 1 plus 2 ?", " ".join(["one"] * 100))
    with caplog.at_level("WARNING", logger="curvsafe"):
        (batch,) = make_batches(tok, [long], max_length=fit_max_length(4096, model))
    assert batch["input_ids"].shape[1] == 64 and "1 of 1 examples cut at max_length (64 tokens" in caplog.text
    caplog.clear()
    huge = Pair("word " * 2_000_000, "yes")  # a 10 MB prompt
    pairs = [Pair("what is 1 plus 2 ?", "3"), huge, Pair("hi", "one two three four five six seven eight")]
    with caplog.at_level("WARNING", logger="curvsafe"):
        batches = make_batches(tok, pairs, batch_size=8, max_length=16)
    assert sum(b["input_ids"].shape[0] for b in batches) == 2
    assert "1 of 3 examples dropped: the prompt alone fills max_length (16 tokens" in caplog.text
    with pytest.raises(DataError, match="none of the 1 examples"):
        make_batches(tok, [huge], max_length=16)
    from curvsafe.eval.generate import fit_prompts

    with caplog.at_level("WARNING", logger="curvsafe"):
        cut = fit_prompts([[1] * 100, [2] * 3], context=64, max_new_tokens=32)
    assert [len(p) for p in cut] == [32, 3] and "1 of 2 prompts do not fit" in caplog.text


@pytest.mark.parametrize("command", ["eval", "factors"])
def test_unwritable_out_is_refused_before_the_work(setup, tmp_path, monkeypatch, capsys, command):  # noqa: F811
    """Before: eval and factors found out that --out cannot be written only after generating / fitting."""
    import curvsafe.models

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(curvsafe.models, "load_model", no_loading)
    (tmp_path / "blocker").write_text("")
    out = tmp_path / "blocker" / "out"
    data = ["--harmful" if command == "eval" else "--data", str(setup / "harmful.jsonl")]
    assert main([command, "--model", str(setup / "aligned"), *data, "--out", str(out)]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_replacing_a_file_leaves_no_stale_copy_and_outputs_follow_the_umask(tmp_path):
    """Before: a `.NAME.old` file stayed behind when --out was a file, and output folders were mode 0700."""
    out = tmp_path / "report.json"
    out.write_text("old")
    tmp = tmp_path / ".report.json.tmp-x"
    tmp.write_text("new")
    commit(tmp, out)
    assert out.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    previous = os.umask(0o022)
    try:
        with staged_dir(tmp_path / "folder") as folder:
            (folder / "a.txt").write_text("a")
    finally:
        os.umask(previous)
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "folder" / "a.txt").stat().st_mode & 0o777 == 0o644


def test_cli_writes_outputs_with_the_umask_and_replaces_files_cleanly(setup, tmp_path):  # noqa: F811
    previous = os.umask(0o022)
    try:
        out = tmp_path / "f.pt"
        args = ["factors", "--model", str(setup / "aligned"), "--data", str(setup / "task.jsonl"), "--out", str(out),
                "--modules", "*.mlp.down_proj", "--limit", "4"]
        assert main(args) == 0 and main(args + ["--force"]) == 0
        assert out.stat().st_mode & 0o777 == 0o644
        assert sorted(p.name for p in tmp_path.iterdir()) == ["f.pt"]
        assert main(restore_args(setup, tmp_path / "r", "--method", "sgd", "--iterations", "1", "--task-budget",
                                 "1")) == 0
        assert (tmp_path / "r").stat().st_mode & 0o777 == 0o755
    finally:
        os.umask(previous)
