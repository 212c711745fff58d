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
    from curvsafe.demo import build_tokenizer, write_data
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("cli")
    tok = build_tokenizer(root / "model")
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id)).save_pretrained(root / "model")
    write_data(root / "data.jsonl", 12)
    return root


def test_help_and_version():
    out = subprocess.run([sys.executable, "-m", "curvsafe.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("curvsafe ")
    out = subprocess.run([sys.executable, "-m", "curvsafe.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "factors" in out.stdout and "demo" in out.stdout


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
    assert main(["factors", "--model", str(tmp_path), "--data", str(bad), "--out", str(tmp_path / "y.pt")]) == 2
    assert "config.json" in capsys.readouterr().err
