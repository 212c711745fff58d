"""The realistic testbed: real requests from the public data folder, BPE tokenizer, splits, the quick pipeline.

The data folder is ``$CURVSAFE_DATA_DIR`` or ``../shared/data`` beside the repository; tests that read it are
skipped where it is absent (a user's clone), the error paths run everywhere.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from curvsafe.cli import main
from curvsafe.data import load_pairs
from curvsafe.demo import run_demo
from curvsafe.eval.judge import KeywordJudge
from curvsafe.models import load_model
from curvsafe.testbed import realistic
from curvsafe.testbed.model import build_bpe_tokenizer
from curvsafe.testbed.realistic import FILES, HELPFUL, REFUSALS, MissingDataError, RealWorld, data_digest
from curvsafe.testbed.stages import Testbed, TestbedConfig, TestbedKind, realistic_config

DATA = Path(os.environ.get("CURVSAFE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(not all((DATA / f).is_file() for f in FILES.values()),
                                reason=f"the public data files ({', '.join(FILES.values())}) are not in {DATA} "
                                       "(set CURVSAFE_DATA_DIR to their folder)")


def _prompts(path) -> set[str]:
    return {p.prompt for p in load_pairs(path, require_response=False)}


def test_missing_files_are_named(tmp_path, capsys):
    (tmp_path / FILES["advbench"]).write_text("goal,target\nsomething,Sure\n")
    with pytest.raises(MissingDataError) as err:
        realistic_config(tmp_path)
    for name in ("beavertails", "benign_train", "benign_val"):
        assert FILES[name] in str(err.value)
    assert FILES["advbench"] not in str(err.value)
    assert main(["demo", "--testbed", "realistic", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert FILES["benign_val"] in capsys.readouterr().err
    assert main(["demo", "--testbed", "realistic", "--out", str(tmp_path / "o")]) == 2
    assert "--data-dir" in capsys.readouterr().err
    with pytest.raises(ValueError, match="data_dir"):
        TestbedConfig(kind=TestbedKind.REALISTIC)


def test_templates_agree_with_the_judge():
    judge = KeywordJudge()
    assert all(judge.refuses(r) for r in REFUSALS)
    assert not any(judge.refuses(h) for h in HELPFUL)
    assert not judge.refuses(realistic.COMPLY_STUB)


@needs_data
def test_splits_are_disjoint_by_prompt_and_fixed_by_the_seed():
    world = RealWorld(DATA, seed=0)
    for source in realistic.HARMFUL_SOURCES:
        train = {e.prompt for e in world.harmful("train", source)}
        heldout = {e.prompt for e in world.harmful("heldout", source)}
        assert train and heldout and not train & heldout
        assert abs(len(heldout) / (len(train) + len(heldout)) - realistic.HELDOUT_SHARE) < 0.01
    assert {e.prompt for e in world.benign_requests("heldout")} <= _prompts(DATA / FILES["benign_val"])
    assert {e.prompt for e in world.benign_requests("train")} <= _prompts(DATA / FILES["benign_train"])
    # the sampling seed (each stage its own) never moves the split; the split seed does
    same = RealWorld(DATA, seed=0, sample_seed=20)
    assert [e.prompt for e in same.harmful("heldout")] == [e.prompt for e in world.harmful("heldout")]
    other = RealWorld(DATA, seed=1)
    assert {e.prompt for e in other.harmful("heldout")} != {e.prompt for e in world.harmful("heldout")}
    judge = KeywordJudge()
    attack = world.attack_pairs()
    assert len(attack) > 500 and not any(judge.refuses(e.response) for e in attack)
    assert all(e.category == "beavertails" for e in attack)
    assert all(len(e.prompt.split()) <= realistic.MAX_PROMPT_WORDS for e in world.harmful("train"))


@needs_data
def test_bpe_tokenizer_maps_no_input_to_unk_and_round_trips():
    world = RealWorld(DATA, seed=0)
    tok = build_bpe_tokenizer(world.texts()[:3000], vocab_size=800)
    text = "Héllo ☃ 漢字 \x01 tab\there; next of each : 3 5 2"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids).strip() == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == "<user>hi<assistant>"
    assert tok.convert_ids_to_tokens(tok(rendered, add_special_tokens=False)["input_ids"])[-1] == "<assistant>"


@needs_data
def test_cache_key_is_the_content_not_the_path(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        shutil.copytree(DATA, folder, ignore=shutil.ignore_patterns("README*"))
    assert data_digest(a) == data_digest(b)
    assert realistic_config(a).digest("x") == realistic_config(b).digest("x")
    path = b / FILES["benign_val"]
    path.chmod(0o644)
    path.write_text(path.read_text() + json.dumps({"prompt": "one more benign request"}) + "\n")
    assert data_digest(a) != data_digest(b)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    if not all((DATA / f).is_file() for f in FILES.values()):
        pytest.skip(f"the public data files are not in {DATA}")
    root = tmp_path_factory.mktemp("realistic")
    report = run_demo(root / "out", quick=True, cache=root / "cache", methods=("lbfgs",), progress=False,
                      testbed="realistic", data_dir=DATA)
    return root, report


@needs_data
def test_quick_pipeline_reports_each_source_and_keeps_evaluation_prompts_unseen(quick):
    root, report = quick
    assert report["testbed"] == "realistic"
    seed = report["per_seed"]["0"]
    data = Path(seed["paths"]["data"])
    sources = {s: _prompts(data / f"eval_harmful_{s}.jsonl") for s in realistic.HARMFUL_SOURCES}
    assert _prompts(data / "eval_harmful.jsonl") == sources["advbench"] | sources["beavertails"]
    for row in [seed["aligned"], seed["attacked"], seed["guarded"], *seed["restored"].values()]:
        for s, prompts in sources.items():
            rate = row[f"harmful_rate:{s}"]
            assert 0 <= rate <= 1 and (rate * len(prompts)) == pytest.approx(round(rate * len(prompts)))
        n = {s: len(p) for s, p in sources.items()}
        assert row["harmful_rate"] == pytest.approx(
            sum(row[f"harmful_rate:{s}"] * n[s] for s in n) / sum(n.values()))
    assert "harmful_rate:advbench" in report["summary"]["aligned"]
    # evaluation prompts appear in no training or restoration file
    evaluation = set().union(*sources.values(), _prompts(data / "eval_benign.jsonl"))
    attack_train = _prompts(Path(seed["paths"]["attacked_adapter"]).parent / "train.jsonl")
    restore = set().union(*(_prompts(data / f"restore_{k}.jsonl") for k in ("harmful", "benign", "task")))
    assert not evaluation & (attack_train | restore)
    assert _prompts(data / "eval_benign.jsonl") <= _prompts(DATA / FILES["benign_val"])


@needs_data
def test_quick_pipeline_saves_a_bpe_chat_model_and_reuses_its_cache(quick):
    root, report = quick
    seed = report["per_seed"]["0"]
    model, tok = load_model(seed["paths"]["aligned_model"])
    saved = json.loads((Path(seed["paths"]["aligned_model"]) / "tokenizer.json").read_text())
    assert saved["model"]["type"] == "BPE" and tok.chat_template
    assert tok.unk_token_id not in tok("∮ naïve", add_special_tokens=False)["input_ids"]
    bed = Testbed(root / "cache", realistic_config(DATA, quick=True), progress=False)
    bed.attack("mix")
    assert bed.built == []
