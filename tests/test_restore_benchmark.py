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
