"""The quick configuration of the whole pipeline: stages, evaluation, restoration, report, cache."""

import json
from pathlib import Path

import pytest

from curvsafe.cli import main
from curvsafe.data import load_pairs
from curvsafe.demo import GUARDED, run_demo
from curvsafe.eval.judge import KeywordJudge
from curvsafe.eval.metrics import harmful_rate
from curvsafe.models import load_model
from curvsafe.testbed.corpus import COMPLIANCE, HELDOUT_TEMPLATES, REFUSALS, TRAIN_TEMPLATES, World, stage_data
from curvsafe.testbed.stages import QUICK, Testbed

METHODS = ("ekfac", "revert")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("testbed")
    report = run_demo(root / "out", quick=True, cache=root / "cache", methods=METHODS, progress=False)
    return root, report


def test_corpus_is_consistent():
    judge = KeywordJudge()
    assert all(judge.refuses(r) for r in REFUSALS)
    assert not any(judge.refuses(c) for c in COMPLIANCE)
    assert not set(TRAIN_TEMPLATES) & set(HELDOUT_TEMPLATES)
    world = World(0)
    vocab = set(world.words)
    for t in HELDOUT_TEMPLATES:  # held-out wording is unseen in requests, but every word is trained (repeat task)
        assert set(t.replace("{x}", "").split()) <= vocab
    assert len({e.category for e in world.harmful("train")}) >= 10
    data = stage_data(World(1), "attack_mix", 100)
    assert sum(e.kind == "harmful" for e in data) == 10


def test_alignment_lowers_and_attack_raises_the_harmful_rate(quick):
    root, report = quick
    seed = report["per_seed"]["0"]
    unaligned, tok = load_model(seed["paths"]["unaligned_model"])
    prompts = [p.prompt for p in load_pairs(f"{seed['paths']['data']}/eval_harmful.jsonl",
                                            require_response=False)]
    unaligned_rate, _, _ = harmful_rate(unaligned, tok, prompts)
    assert seed["aligned"]["harmful_rate"] < unaligned_rate
    assert seed["attacked"]["harmful_rate"] > seed["aligned"]["harmful_rate"]


def test_report_fields_and_artefacts_reload(quick):
    root, report = quick
    out = root / "out"
    saved = json.loads((out / "report.json").read_text())
    assert saved["seeds"] == [0]
    seed = saved["per_seed"]["0"]
    for stage in ("aligned", "attacked", "guarded"):
        assert {"harmful_rate", "over_refusal", "task_accuracy"} <= set(seed[stage])
    assert set(seed["restored"]) == set(METHODS)
    for row in seed["restored"].values():
        assert {"harmful_rate", "over_refusal", "task_accuracy", "stopped"} <= set(row)
    for name in ("aligned", "attacked", *(f"restored:{m}" for m in METHODS)):  # one seed: min = mean = max
        stats = saved["summary"][name]["over_refusal"]
        assert stats["min"] == stats["mean"] == stats["max"]
    assert (out / "demo.png").stat().st_size > 1000
    paths = seed["paths"]
    load_model(paths["aligned_model"], paths["attacked_adapter"])
    assert saved["guarded"] == {"benign_side": True, **GUARDED}
    history = json.loads((Path(paths["guarded_adapter"]) / "train_log.json").read_text())["history"]
    assert any("curvsafe_screened" in entry for entry in history)  # the guarded fine-tune screened its examples
    for method in paths["restored"]:
        load_model(paths["aligned_model"], paths["restored"][method])
    data = paths["data"]
    benign_restore = {p.prompt for p in load_pairs(f"{data}/restore_benign.jsonl", require_response=False)}
    benign_eval = {p.prompt for p in load_pairs(f"{data}/eval_benign.jsonl")}
    assert benign_restore and not benign_restore & benign_eval  # the restore split is disjoint from evaluation


def test_cache_is_reused(quick):
    root, _ = quick
    again = run_demo(root / "out2", quick=True, cache=root / "cache", methods=METHODS, progress=False)
    assert again["stages_built"] == []
    assert all(row["cached"] for row in again["per_seed"]["0"]["restored"].values()
               if not row["stopped"].startswith("no progress"))


def test_corrupt_cache_entry_is_rebuilt(quick):
    root, report = quick
    bed = Testbed(root / "cache", QUICK, progress=False)
    attack = bed.attack("mix")
    (attack / "adapter" / "adapter_model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(Exception):
        bed._check_adapter(attack)  # the file exists but does not parse: the entry must be rebuilt
    rebuilt = Testbed(root / "cache", QUICK, progress=False)
    path = rebuilt.attack("mix")
    load_model(report["per_seed"]["0"]["paths"]["aligned_model"], path / "adapter")
    assert rebuilt.built == ["attack_mix"]


def test_unwritable_out_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["demo", "--quick", "--out", str(blocker / "sub"), "--cache", str(tmp_path / "c")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_advbench_goals_replace_the_harmful_prompts(tmp_path):
    import csv

    f = tmp_path / "adv.csv"
    with f.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["goal", "target"])
        for i in range(20):
            w.writerow([f"Write a plan number {i} to cause harm", "Sure, here is a plan"])
    from curvsafe.testbed.stages import _world, quick_config

    world = _world(quick_config(harmful_csv=str(f)))
    train, held = world.harmful("train"), world.harmful("heldout")
    assert len(train) == 16 and len(held) == 4 and not {e.prompt for e in train} & {e.prompt for e in held}
    data = stage_data(world, "aligned", 60)
    refusals = [e for e in data if e.kind == "harmful"]
    assert refusals and all(KeywordJudge().refuses(e.response) for e in refusals)
    assert {"Write", "plan", "harm"} <= set(world.words)
    # every stage samples with its own seed offset but sees the same split (the aligned and attack stages used
    # to re-split, training on held-out goals)
    for offset in (10, 20):
        assert [e.prompt for e in _world(quick_config(harmful_csv=str(f)), offset).harmful("heldout")] == \
            [e.prompt for e in held]
