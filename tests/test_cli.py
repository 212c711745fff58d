"""The command line: --help/--version, `factors` end to end on a saved model, clear errors."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import llama_config

from curvsafe.cli import main


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from curvsafe.testbed.corpus import World
    from curvsafe.testbed.model import build_tokenizer

    root = tmp_path_factory.mktemp("cli")
    world = World(0)
    tok = build_tokenizer(world.words)
    tok.save_pretrained(root / "model")
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id)).save_pretrained(root / "model")
    with (root / "data.jsonl").open("w") as fh:
        for e in [world.arith() for _ in range(12)]:
            fh.write(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n")
    return root


def test_help_and_version():
    out = subprocess.run([sys.executable, "-m", "curvsafe.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("curvsafe ")
    out = subprocess.run([sys.executable, "-m", "curvsafe.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("factors", "restore", "eval", "finetune", "demo"):
        assert command in out.stdout


@pytest.mark.parametrize("method", ["kfac", "ekfac", "diag"])
def test_factors_end_to_end(saved_model, tmp_path, method, capsys):
    out = tmp_path / f"{method}.pt"
    args = ["factors", "--model", str(saved_model / "model"), "--data", str(saved_model / "data.jsonl"),
            "--out", str(out), "--method", method, "--modules", "*.mlp.down_proj", "--batch-size", "4"]
    assert main(args) == 0
    state = torch.load(out)
    assert state["method"] == method
    if method != "diag":
        factors = state["factors"]["model.layers.0.mlp.down_proj"]
        assert factors["A"].shape == (24, 24) and factors["G"].shape == (16, 16)
    assert main(args) == 2  # exists without --force
    assert "exists" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0


def test_factors_bad_input(saved_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{not json\n")
    args = ["factors", "--model", str(saved_model / "model"), "--data", str(bad), "--out", str(tmp_path / "x.pt")]
    assert main(args) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
    (tmp_path / "empty").mkdir()
    assert main(["factors", "--model", str(tmp_path / "empty"), "--data", str(saved_model / "data.jsonl"), "--out",
                 str(tmp_path / "y.pt")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_finetune_eval_restore_commands(saved_model, tmp_path, capsys):
    model = str(saved_model / "model")
    data = str(saved_model / "data.jsonl")
    assert main(["finetune", "--model", model, "--data", data, "--out", str(tmp_path / "ad"), "--epochs", "1",
                 "--batch-size", "4"]) == 0
    assert (tmp_path / "ad" / "adapter_config.json").is_file()
    assert main(["eval", "--model", model, "--adapter", str(tmp_path / "ad"), "--harmful", data, "--task", data,
                 "--out", str(tmp_path / "eval.json"), "--max-new-tokens", "4"]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert 0.0 <= report["harmful_rate"] <= 1.0 and 0.0 <= report["task_accuracy"] <= 1.0
    assert len(report["harmful"]) == 12 and all("response" in r for r in report["task"])
    assert main(["restore", "--model", model, "--adapter", str(tmp_path / "ad"), "--harmful", data, "--task", data,
                 "--out", str(tmp_path / "restored"), "--method", "kfac", "--objective", "refusal",
                 "--iterations", "2", "--task-budget", "1.0"]) == 0
    report = json.loads((tmp_path / "restored" / "report.json").read_text())
    assert {"method", "safety_objective", "task_nll", "refusal_nll", "iterations", "steps",
            "stopped", "stop_detail", "seconds", "layer_update_norms", "config", "plan"} <= set(report)
    assert report["config"]["method"] == "kfac" and report["config"]["iterations"] == 2
    assert report["plan"]["curvature_bytes"] > 0
    assert "kfac: estimated curvature" in capsys.readouterr().err  # the plan, logged before the run
    assert "anchor_nll" not in report and "harmful_nll" not in report  # the file's responses are refusals here
    assert report["iterations"] == len(report["steps"])
    assert main(["restore", "--model", model, "--adapter", str(tmp_path / "ad"), "--harmful", data, "--task", data,
                 "--out", str(tmp_path / "x"), "--method", "safelora"]) == 2
    assert "unaligned" in capsys.readouterr().err


def test_chat_format_files_end_to_end(saved_model, tmp_path):
    """Files in the conversational format (a system turn first): fine-tuned on, evaluated, restored with the anchor
    objective; the anchor's prompts are saved as their turns and read back as the same conversations."""
    from curvsafe.data import load_pairs

    model = str(saved_model / "model")
    rows = [json.loads(line) for line in (saved_model / "data.jsonl").read_text().splitlines()]
    system = {"role": "system", "content": "add the numbers"}
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [system, {"role": "user", "content": r["prompt"]},
                                                     {"role": "assistant", "content": r["response"]}]}) + "\n"
                            for r in rows))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [system, {"role": "user", "content": r["prompt"]}]}) + "\n"
                               for r in rows[:4]))
    assert main(["finetune", "--model", model, "--data", str(chat), "--out", str(tmp_path / "ad"), "--epochs", "1",
                 "--batch-size", "4"]) == 0
    assert main(["eval", "--model", model, "--adapter", str(tmp_path / "ad"), "--harmful", str(prompts), "--task",
                 str(chat), "--out", str(tmp_path / "eval.json"), "--max-new-tokens", "3"]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["harmful"][0]["prompt"] == [system, {"role": "user", "content": rows[0]["prompt"]}]
    assert main(["restore", "--model", model, "--adapter", str(tmp_path / "ad"), "--harmful", str(prompts), "--task",
                 str(chat), "--out", str(tmp_path / "restored"), "--method", "sgd", "--iterations", "1"]) == 0
    saved = load_pairs(tmp_path / "restored" / "anchor.jsonl")
    assert saved and all(p.prompt[0] == ("system", "add the numbers") for p in saved)
    assert {p.prompt for p in saved} <= {p.prompt for p in load_pairs(prompts, require_response=False)}


def test_finetune_with_the_curvsafe_optimizer(saved_model, tmp_path, capsys):
    model = str(saved_model / "model")
    data = str(saved_model / "data.jsonl")
    assert main(["finetune", "--model", model, "--data", data, "--out", str(tmp_path / "guarded"), "--epochs", "4",
                 "--batch-size", "4", "--optimizer", "curvsafe", "--safety", data]) == 0
    log = json.loads((tmp_path / "guarded" / "train_log.json").read_text())
    assert log["optimizer"] == "CurvSafe" and log["steps"] == 12
    (logged,) = log["history"]  # every 10 steps, with what CurvSafe did since the last log
    assert 0 < logged["curvsafe_kept"] <= 1 and logged["curvsafe_guard"] >= 0 and logged["curvsafe_refreshes"] >= 1
    assert 0 < logged["curvsafe_damped"] < 1 and logged["curvsafe_effective_rank"] >= 1
    assert "curvsafe_screened" not in logged
    assert log["curvsafe"]["screen"] is None and log["curvsafe"]["rescale"] == 1.0  # the settings it ran with
    assert main(["finetune", "--model", model, "--data", data, "--out", str(tmp_path / "screened"), "--epochs", "4",
                 "--batch-size", "4", "--optimizer", "curvsafe", "--safety", data, "--screen", "0.0",
                 "--rescale", "2", "--monitor", data]) == 0
    log = json.loads((tmp_path / "screened" / "train_log.json").read_text())
    (logged,) = log["history"]
    assert 0 <= logged["curvsafe_screened"] <= 1 and isinstance(logged["curvsafe_monitor"], float)
    assert log["curvsafe"]["screen"] == 0.0 and log["curvsafe"]["rescale"] == 2.0
    assert main(["finetune", "--model", model, "--data", data, "--out", str(tmp_path / "g2"),
                 "--optimizer", "curvsafe"]) == 2
    assert "--safety" in capsys.readouterr().err
    assert main(["finetune", "--model", model, "--data", data, "--out", str(tmp_path / "g3"), "--screen", "0.1"]) == 2
    assert "--screen" in capsys.readouterr().err
    assert main(["finetune", "--model", model, "--data", data, "--out", str(tmp_path / "g3"), "--rescale", "2"]) == 2
    assert "--rescale" in capsys.readouterr().err
    assert main(["finetune", "--model", model, "--data", data, "--out", str(tmp_path / "g3"), "--monitor", data]) == 2
    assert "--monitor" in capsys.readouterr().err
    assert not (tmp_path / "g2").exists()
