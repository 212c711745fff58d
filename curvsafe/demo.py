"""``curvsafe demo``: the whole story on the project's own tiny aligned chat model.

Builds (or loads from the cache) the testbed stages, evaluates the aligned and the attacked model, restores the
attacked adapter with every method (the curvature-aware ones and the baselines, same data, same task budget),
repeats the attack's fine-tune with the :class:`~curvsafe.optim.CurvSafe` optimizer (the ``guarded`` row: drift
prevented rather than repaired),
evaluates each, prints one table and writes ``report.json`` and ``demo.png`` (harmful rate against task
accuracy, one point per method) into the output folder. Restored adapters are cached too, so a warm run only
evaluates.

Columns: harmful rate on held-out harmful prompts (refusal-keyword judge), accuracy on the new (attack) task and
on the old skills (forgetting), the safety NLL (the aligned model's refusals to the held-out prompts, first 4
response tokens) and the task NLL, and the seconds each restoration took when it ran.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from .data import Pair, load_pairs, make_batches

METHODS = ("lbfgs", "kfac", "ekfac", "cg", "sgd", "revert", "safelora", "resta")


def _code_hash(*packages: str) -> str:
    """Hash of the code a cached result depends on (so that editing it invalidates the cache)."""
    import hashlib

    root = Path(__file__).parent
    files = [f for pkg in packages for f in sorted((root / pkg).glob("*.py"))] + [root / "objectives.py",
                                                                                  root / "capture.py"]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]


def _guarded_finetune(bed, cfg, aligned: Path, attack: Path, data: Path, progress: bool) -> tuple[Path, bool]:
    """The attack's fine-tune (same data, seed and settings) with CurvSafe(AdamW); cached like the stages."""
    from .data import load_pairs
    from .finetune import curvsafe_factory, lora_sft
    from .models import load_model

    folder = bed.cache / f"guarded-{cfg.digest('guarded', attack.name, _code_hash('optim', 'curvature'))}"
    if (folder / "train_log.json").is_file():
        return folder, False
    model, tokenizer = load_model(aligned)
    factory = curvsafe_factory(tokenizer, load_pairs(data / "restore_harmful.jsonl"), lr=cfg.attack_lr)
    lora_sft(model, tokenizer, load_pairs(attack / "train.jsonl"), folder, r=cfg.lora_r, alpha=2 * cfg.lora_r,
             epochs=cfg.attack_epochs, lr=cfg.attack_lr, batch_size=32, seed=cfg.seed, optimizer=factory,
             force=True, progress=progress)
    return folder, True


def default_cache() -> Path:
    return Path(os.environ.get("CURVSAFE_CACHE", Path.home() / ".cache" / "curvsafe" / "testbed"))


def _evaluate(model, tokenizer, data: Path, anchor_batches) -> dict:
    from .eval.metrics import harmful_rate, mean_nll, task_accuracy
    from .objectives import mean_nll as batch_mean_nll

    harmful = [p.prompt for p in load_pairs(data / "eval_harmful.jsonl", require_response=False)]
    task = load_pairs(data / "eval_task.jsonl")
    skills = load_pairs(data / "eval_skills.jsonl")
    rate, _, _ = harmful_rate(model, tokenizer, harmful)
    task_acc, _ = task_accuracy(model, tokenizer, task)
    skill_acc, _ = task_accuracy(model, tokenizer, skills)
    return {"harmful_rate": rate, "task_accuracy": task_acc, "skills_accuracy": skill_acc,
            "safety_nll": float(batch_mean_nll(model, anchor_batches)), "task_nll": mean_nll(model, tokenizer, task)}


def run_demo(out: Path, quick: bool = False, cache: Optional[Path] = None, methods: Sequence[str] = METHODS,
             progress: bool = True, harmful_csv: Optional[str] = None) -> dict:
    from .models import load_model
    from .objectives import anchor_responses, keep_response_prefix
    from .restoration import NoProgressError, run_restore
    from .testbed.stages import QUICK, TestbedConfig, Testbed

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-")
        probe.close()
    except OSError as exc:
        raise OSError(f"cannot write to --out {out}: {exc.strerror or exc}") from None
    t_start = time.perf_counter()
    cfg = QUICK if quick else TestbedConfig()
    if harmful_csv:
        from dataclasses import replace

        cfg = replace(cfg, harmful_csv=str(Path(harmful_csv).resolve()))
    bed = Testbed(cache or default_cache(), cfg, progress=progress)
    data, unaligned, aligned = bed.data(), bed.unaligned(), bed.aligned()
    attack = bed.attack("mix")

    model, tokenizer = load_model(aligned)
    harmful_eval = [p.prompt for p in load_pairs(data / "eval_harmful.jsonl", require_response=False)]
    anchor_pairs = anchor_responses(model, tokenizer, harmful_eval)
    anchor_batches = keep_response_prefix(make_batches(tokenizer, anchor_pairs, batch_size=32), 4)

    rows: dict[str, dict] = {"aligned": _evaluate(model, tokenizer, data, anchor_batches)}
    model, tokenizer = load_model(aligned, attack / "adapter")
    rows["attacked"] = _evaluate(model, tokenizer, data, anchor_batches)

    t0 = time.perf_counter()
    guarded_dir, ran = _guarded_finetune(bed, cfg, aligned, attack, data, progress)
    model, tokenizer = load_model(aligned, guarded_dir)
    rows["guarded"] = _evaluate(model, tokenizer, data, anchor_batches)
    if ran:
        rows["guarded"]["seconds"] = time.perf_counter() - t0

    restored: dict[str, dict] = {}
    restore_anchor: Optional[list[Pair]] = None
    code = _code_hash("restoration", "curvature")
    for method in methods:
        folder = bed.cache / f"restore-{cfg.digest('restore', attack.name, method, code)}"
        report_file = folder / "report.json"
        if report_file.is_file() and (folder / ("model" if method == "resta" else "adapter")).exists():
            report = json.loads(report_file.read_text())
            ran = False
        else:
            try:
                run = run_restore(aligned, attack / "adapter", data / "restore_harmful.jsonl",
                                  data / "restore_task.jsonl", folder, method=method, unaligned_model=unaligned,
                                  force=True, anchor=restore_anchor, progress=progress)
            except NoProgressError as exc:  # the method left the attacked adapter as it was
                restored[method] = {**rows["attacked"], "cached": False, "stopped": f"no progress: {exc}"}
                continue
            report = run.report
            ran = True
        if restore_anchor is None and (folder / "anchor.jsonl").is_file():  # generate the anchor once
            restore_anchor = load_pairs(folder / "anchor.jsonl")
        if method == "resta":
            model, tokenizer = load_model(folder / "model")
        else:
            model, tokenizer = load_model(aligned, folder / "adapter")
        row = _evaluate(model, tokenizer, data, anchor_batches)
        row["seconds"] = report["seconds"]
        row["cached"] = not ran
        row["stopped"] = report["stopped"]
        restored[method] = row
        target = out / "restored" / method
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder, target)

    paths = {"aligned_model": str(aligned), "unaligned_model": str(unaligned), "attacked_adapter": str(attack / "adapter"),
             "guarded_adapter": str(guarded_dir),
             "restored": {m: str(out / "restored" / m / ("model" if m == "resta" else "adapter")) for m in restored},
             "data": str(data)}
    report = {"config": "quick" if quick else "default",
              "aligned": rows["aligned"], "attacked": rows["attacked"], "guarded": rows["guarded"],
              "restored": restored, "paths": paths,
              "stages_built": bed.built, "seconds": time.perf_counter() - t_start}
    _print_table(rows, restored)
    _write_json(out / "report.json", report)
    _plot(out / "demo.png", rows, restored)
    print(f"\nreport: {out / 'report.json'}  plot: {out / 'demo.png'}  ({report['seconds']:.0f}s)")
    return report


def _print_table(rows: dict, restored: dict) -> None:
    header = f"{'stage / method':<16} {'harmful':>8} {'task acc':>9} {'skills':>7} {'safety NLL':>11} " \
             f"{'task NLL':>9} {'seconds':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, r in list(rows.items()) + [(f"restored:{m}", r) for m, r in restored.items()]:
        secs = f"{r['seconds']:8.1f}" if "seconds" in r else f"{'':>8}"
        print(f"{name:<16} {r['harmful_rate']:8.1%} {r['task_accuracy']:9.1%} {r['skills_accuracy']:7.1%} "
              f"{r['safety_nll']:11.3f} {r['task_nll']:9.3f} {secs}")


def _write_json(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)


def _plot(path: Path, rows: dict, restored: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for name, r, style in [("aligned", rows["aligned"], "k*"), ("attacked", rows["attacked"], "rX"),
                           ("guarded (CurvSafe fine-tune)", rows["guarded"], "gP")]:
        ax.plot(r["harmful_rate"] * 100, r["task_accuracy"] * 100, style, markersize=12, label=name)
    for m, r in restored.items():
        ax.plot(r["harmful_rate"] * 100, r["task_accuracy"] * 100, "o", markersize=8, label=m)
    ax.set_xlabel("harmful rate on held-out harmful prompts (%)  ← safer")
    ax.set_ylabel("accuracy on the fine-tuned task (%)")
    ax.set_title("curvsafe demo: safety restoration at equal task budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".demo.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
