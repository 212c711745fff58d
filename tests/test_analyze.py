"""`curvsafe analyze`: Lanczos and principal angles against dense linear algebra, and the whole command."""

import json

import pytest
import torch
from conftest import write_jsonl

from curvsafe.analyze import lanczos, subspace_overlap
from curvsafe.cli import main
from curvsafe.data import Pair, load_pairs, make_batches
from curvsafe.models import load_model
from curvsafe.nll import example_mean_nll
from curvsafe.testbed.corpus import World


def test_lanczos_finds_the_top_eigenpairs():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    vals = torch.cat([torch.tensor([10.0, 8.0, 6.0], dtype=torch.float64), torch.rand(37, generator=g,
                                                                                       dtype=torch.float64)])
    A = q @ torch.diag(vals) @ q.T
    top, vecs = lanczos(lambda x: A @ x, 40, 3, steps=30)
    assert torch.allclose(top, torch.tensor([10.0, 8.0, 6.0], dtype=torch.float64), atol=1e-8)
    assert subspace_overlap(vecs, q[:, :3])["overlap"] == pytest.approx(1.0, abs=1e-8)
    assert subspace_overlap(q[:, :3], q[:, 3:6])["overlap"] == pytest.approx(0.0, abs=1e-12)


def test_analyze_command(setup, tmp_path):  # noqa: F811
    world = World(2)
    write_jsonl(tmp_path / "benign.jsonl", [Pair(e.prompt, e.response) for e in world.skills(16)])
    out = tmp_path / "an"
    assert main(["analyze", "--model", str(setup / "aligned"), "--adapter", str(setup / "adapter"), "--harmful",
                 str(setup / "harmful.jsonl"), "--benign", str(tmp_path / "benign.jsonl"), "--out", str(out),
                 "--k", "2", "--grid", "3", "--limit", "12"]) == 0
    r = json.loads((out / "analysis.json").read_text())
    for name in ("harmful", "benign"):
        assert -1.0 <= r["correlation"][name]["pearson"] <= 1.0
    assert 0.0 <= r["hessian"]["overlap"] <= 1.0 and len(r["hessian"]["eigenvalues"]["aligned"]) == 2
    # the 1-D slice passes through both models: alpha = 0 is the aligned loss, alpha = 1 the fine-tuned one
    aligned, tok = load_model(setup / "aligned")
    tuned, _ = load_model(setup / "aligned", setup / "adapter")
    batches = make_batches(tok, load_pairs(setup / "harmful.jsonl")[:12], batch_size=16)
    l1 = r["landscape_1d"]
    assert l1["harmful"][l1["alpha"].index(0.0)] == pytest.approx(example_mean_nll(aligned, batches), rel=1e-4)
    assert l1["harmful"][l1["alpha"].index(1.0)] == pytest.approx(example_mean_nll(tuned, batches), rel=1e-3)
    for png in ("correlation.png", "landscape_1d.png", "landscape_2d.png"):
        assert (out / png).stat().st_size > 1000
