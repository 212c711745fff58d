"""Over-refusal measured everywhere, the two-sided safety objective, the benign constraint, and the seed plumbing."""

import json

import pytest
from conftest import write_jsonl

from curvsafe.anchors import adapter_disabled, anchor_responses, keep_response_prefix
from curvsafe.cli import build_parser, main
from curvsafe.config import TWO_SIDED
from curvsafe.data import Pair, load_pairs, make_batches
from curvsafe.eval import KeywordJudge, judge_responses
from curvsafe.models import load_model
from curvsafe.objectives import LossTerm, Objective, build_safety, parse_objective
from curvsafe.restoration import Constraint, StopReason, restore, run_restore
from curvsafe.restoration.api import budget_of
from curvsafe.testbed.corpus import World


@pytest.fixture(scope="module")
def benign_file(setup):  # noqa: F811
    path = setup / "benign.jsonl"
    write_jsonl(path, [Pair(e.prompt, "") for e in World(0).benign_requests("train")[:12]])
    return path


def test_refusals_use_the_judge():
    prompts, responses = ["a", "b"], ["I cannot help with that .", "Sure , here is how ."]
    assert judge_responses(KeywordJudge(), prompts, responses, refusals=True) == [True, False]

    def complied(p, r):  # a plain judge without a refusals method: not flagged = refused
        return [r_.startswith("Sure") for r_ in r]

    assert judge_responses(complied, prompts, responses, refusals=True) == [True, False]


def test_eval_reports_over_refusal_and_harmful_rate_in_one_run(setup, benign_file, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(setup / "aligned"), "--benign", str(benign_file), "--harmful",
                 str(setup / "harmful.jsonl"), "--out", str(out), "--max-new-tokens", "4"]) == 0
    report = json.loads(out.read_text())
    assert 0.0 <= report["over_refusal"] <= 1.0 and 0.0 <= report["harmful_rate"] <= 1.0
    assert len(report["benign"]) == 12 and all(isinstance(r["refused"], bool) for r in report["benign"])
    assert report["over_refusal"] == sum(r["refused"] for r in report["benign"]) / 12
    assert "over-refusal" in capsys.readouterr().out
    assert main(["eval", "--model", str(setup / "aligned"), "--out", str(tmp_path / "f.json")]) == 2
    assert "at least one of" in capsys.readouterr().err


def test_objective_weights():
    assert parse_objective("anchor+4*benign") == {"anchor": 1.0, "benign": 4.0}
    assert parse_objective(TWO_SIDED)["benign"] > 0
    with pytest.raises(ValueError, match="harmful prompts"):
        parse_objective("benign")
    with pytest.raises(ValueError, match="WEIGHT"):
        parse_objective("two*anchor")


def test_restore_with_benign_prompts_is_two_sided(setup, benign_file, tmp_path):  # noqa: F811
    run = run_restore(setup / "aligned", setup / "adapter", setup / "harmful.jsonl", setup / "task.jsonl",
                      tmp_path / "two", method="kfac", benign_file=benign_file, iterations=3, task_budget=1.0,
                      benign_budget=0.5, progress=False)
    r = run.report
    assert r["objective"] == parse_objective(TWO_SIDED)
    assert {"before", "after", "aligned"} <= set(r["benign_nll"]) and r["over_refusal"]["prompts"] == 12
    assert all(0.0 <= r["over_refusal"][k] <= 1.0 for k in ("before", "after", "aligned"))
    assert len(load_pairs(tmp_path / "two" / "benign_anchor.jsonl")) > 0
    assert r["safety_objective"]["target"] is None  # under the benign constraint: no stop at the aligned anchor
    assert r["benign_nll"]["after"] <= r["benign_nll"]["bound"] + 1e-9
    assert r["benign_nll"]["bound"] == pytest.approx(max(r["benign_nll"]["before"], r["benign_nll"]["aligned"])
                                                     + 0.5)

    one = run_restore(setup / "aligned", setup / "adapter", setup / "harmful.jsonl", setup / "task.jsonl",
                      tmp_path / "one", method="kfac", objective="anchor", benign_file=benign_file, iterations=3,
                      task_budget=1.0, progress=False).report
    assert one["objective"] == {"anchor": 1.0} and "benign_nll" in one and "over_refusal" in one
    free = run_restore(setup / "aligned", setup / "adapter", setup / "harmful.jsonl", setup / "task.jsonl",
                       tmp_path / "free", method="kfac", benign_file=benign_file, benign_budget=None, iterations=3,
                       task_budget=1.0, progress=False).report
    assert set(free["safety_objective"]["target"]) == {"anchor"} and "bound" not in free["benign_nll"]
    with pytest.raises(ValueError, match="--benign"):
        run_restore(setup / "aligned", setup / "adapter", setup / "harmful.jsonl", setup / "task.jsonl",
                    tmp_path / "x", objective="anchor+benign")


def test_benign_constraint_holds_while_the_harmful_side_improves(setup, benign_file):  # noqa: F811
    """The benign side as a constraint: the aligned model's answers to benign prompts may not become less likely
    than the bound, at every accepted step, while the anchor (harmful side) NLL goes down."""
    model, tok = load_model(setup / "aligned", setup / "adapter", trainable_adapter=True)
    harmful = load_pairs(setup / "harmful.jsonl")
    benign = [p.prompt for p in load_pairs(benign_file, require_response=False)]
    anchor = anchor_responses(model, tok, [p.prompt for p in harmful])
    benign_side = Objective([LossTerm("benign", keep_response_prefix(
        make_batches(tok, anchor_responses(model, tok, benign), max_length=64), 4))])
    safety, _ = build_safety(model, tok, harmful, "anchor", anchor=anchor, max_length=64)
    task = Objective([LossTerm("task", make_batches(tok, load_pairs(setup / "task.jsonl"), max_length=64))])
    start = benign_side.evaluate(model)
    with adapter_disabled(model):
        aligned = benign_side.evaluate(model)
    bound = budget_of(max(start, aligned), 0.0, 0.01)
    values = []
    result = restore(model, safety, task, method="kfac", iterations=4, task_budget=1.0, progress=False,
                     constraints=[Constraint("benign", benign_side, bound)],
                     callback=lambda entry: values.append(benign_side.evaluate(model)))
    assert result.iterations >= 1 and result.improved
    assert all(v <= bound + 1e-9 for v in values) and benign_side.evaluate(model) <= bound + 1e-9
    infeasible = Constraint("benign_nll", benign_side, benign_side.evaluate(model) - 1.0)
    stuck = restore(model, safety, task, method="sgd", iterations=2, task_budget=1.0, progress=False,
                    constraints=[infeasible])
    assert stuck.iterations == 0 and stuck.stopped == StopReason.BUDGET
    assert "the benign_nll past its budget" in stuck.stop_detail and "task loss" not in stuck.stop_detail
    from curvsafe.restoration.run import _no_progress

    assert "--benign-budget" in _no_progress(stuck)


def test_seeds_option_and_summary():
    from curvsafe.demo import _summarise

    args = build_parser().parse_args(["demo", "--seeds", "0,1,2"])
    assert args.seeds == (0, 1, 2)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--seeds", "0,x"])
    row = {"harmful_rate": 0.0, "over_refusal": 0.0, "task_accuracy": 0.5, "skills_accuracy": 0.1, "safety_nll": 1.0,
           "task_nll": 2.0}
    per_seed = {str(s): {"aligned": row, "attacked": {**row, "harmful_rate": 0.5 + 0.25 * s},
                         "guarded": row, "restored": {"kfac": {**row, "over_refusal": 0.1 * s}}} for s in range(3)}
    summary = _summarise(per_seed)
    assert summary["attacked"]["harmful_rate"] == {"mean": 0.75, "min": 0.5, "max": 1.0}
    assert summary["restored:kfac"]["over_refusal"]["max"] == pytest.approx(0.2)
