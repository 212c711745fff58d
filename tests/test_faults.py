"""Fault injection: ``curvsafe restore`` killed or failing at several points, in a subprocess.

Each run asserts: the inputs are untouched (hashes), ``--out`` is either absent or complete and loadable, an
existing ``--out`` is intact unless ``--force`` (and intact under ``--force`` when the run dies), no temporary
folder is left behind, the exit code, and a single one-line message without a traceback.
"""

import hashlib
import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = Path(__file__).with_name("fault_driver.py")


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(point, action, args, file_limit=None):
    def limit():
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run([sys.executable, str(DRIVER), point, action, *args], capture_output=True, text=True,
                          timeout=600, preexec_fn=limit)


def restore_cmd(inputs: Path, out: Path, *extra):
    return ["restore", "--model", str(inputs / "aligned"), "--adapter", str(inputs / "adapter"), "--harmful",
            str(inputs / "harmful.jsonl"), "--task", str(inputs / "task.jsonl"), "--out", str(out),
            "--method", "sgd", "--iterations", "3", "--task-budget", "1", "--max-length", "64", *extra]


def messages(stderr: str) -> list[str]:
    """curvsafe's own lines on stderr, warnings and the memory plan logged before the run aside (other libraries
    draw progress bars there)."""
    return [line for line in stderr.splitlines() if line.startswith("curvsafe restore:") and ": warning:" not in line
            and "estimated curvature" not in line]


@pytest.fixture
def inputs(setup, tmp_path):  # noqa: F811
    copy = tmp_path / "inputs"
    shutil.copytree(setup, copy, ignore=shutil.ignore_patterns(".*"))
    return copy


def check_common(proc, inputs, before, out_parent, code, needle):
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = messages(proc.stderr)
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert digest(inputs) == before
    assert not [p for p in out_parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.parametrize("point,action,code,needle", [
    ("load", "SIGTERM", 143, "terminated (SIGTERM)"),
    ("load", "raise", 2, "injected fault"),
    ("step", "SIGTERM", 143, "terminated (SIGTERM)"),
    ("step", "SIGINT", 130, "interrupted (SIGINT)"),
    ("save", "SIGTERM", 143, "terminated (SIGTERM)"),
    ("save", "SIGINT", 130, "interrupted (SIGINT)"),
])
def test_killed_or_failing_before_an_output_leaves_nothing(inputs, tmp_path, point, action, code, needle):
    before = digest(inputs)
    outs = tmp_path / "outs"
    outs.mkdir()
    proc = run_cli(point, action, restore_cmd(inputs, outs / "restored"))
    check_common(proc, inputs, before, outs, code, needle)
    assert not (outs / "restored").exists()


def test_failure_after_an_accepted_step_writes_the_last_accepted_state(inputs, tmp_path):
    from curvsafe.models import load_model

    before = digest(inputs)
    outs = tmp_path / "outs"
    outs.mkdir()
    proc = run_cli("step", "raise", restore_cmd(inputs, outs / "restored"))
    check_common(proc, inputs, before, outs, 3, "injected fault")
    report = json.loads((outs / "restored" / "report.json").read_text())
    assert report["stopped"] == "error" and report["iterations"] == 1 and "injected fault" in report["error"]
    load_model(inputs / "aligned", outs / "restored" / "adapter")  # complete and loadable


def test_full_disk_leaves_nothing_and_says_why(inputs, tmp_path):
    """A file-size limit (ulimit -f) below the adapter's size: the write fails with EFBIG."""
    before = digest(inputs)
    outs = tmp_path / "outs"
    outs.mkdir()
    proc = run_cli("none", "-", restore_cmd(inputs, outs / "restored"), file_limit=2048)
    check_common(proc, inputs, before, outs, 2, "File too large")
    assert not (outs / "restored").exists()


def test_full_disk_while_saving_factors(inputs, tmp_path):
    outs = tmp_path / "outs"
    outs.mkdir()
    proc = run_cli("none", "-", ["factors", "--model", str(inputs / "aligned"), "--data", str(inputs / "task.jsonl"),
                                 "--out", str(outs / "f.pt"), "--limit", "4"], file_limit=2048)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "File too large" in proc.stderr.splitlines()[-1]
    assert list(outs.iterdir()) == []


@pytest.mark.parametrize("fault", ["refused", "SIGTERM", "disk"])
def test_an_existing_out_stays_intact(inputs, tmp_path, fault):
    before = digest(inputs)
    outs = tmp_path / "outs"
    (outs / "restored").mkdir(parents=True)
    (outs / "restored" / "keep.txt").write_text("previous result")
    if fault == "refused":  # no --force
        proc = run_cli("none", "-", restore_cmd(inputs, outs / "restored"))
        check_common(proc, inputs, before, outs, 2, "exists; pass --force")
    elif fault == "SIGTERM":
        proc = run_cli("step", "SIGTERM", restore_cmd(inputs, outs / "restored", "--force"))
        check_common(proc, inputs, before, outs, 143, "terminated")
    else:
        proc = run_cli("none", "-", restore_cmd(inputs, outs / "restored", "--force"), file_limit=2048)
        check_common(proc, inputs, before, outs, 2, "File too large")
    assert [p.name for p in (outs / "restored").iterdir()] == ["keep.txt"]
    assert (outs / "restored" / "keep.txt").read_text() == "previous result"


def test_force_replaces_a_complete_out(inputs, tmp_path):
    outs = tmp_path / "outs"
    (outs / "restored").mkdir(parents=True)
    (outs / "restored" / "keep.txt").write_text("previous result")
    proc = run_cli("none", "-", restore_cmd(inputs, outs / "restored", "--force"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (outs / "restored").iterdir()) == ["adapter", "anchor.jsonl", "report.json"]
    assert [p.name for p in outs.iterdir()] == ["restored"]
