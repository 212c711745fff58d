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
from .io import staged_file, write_json

METHODS = ("lbfgs", "kfac", "ekfac", "cg", "sgd", "revert", "safelora", "resta")


def _code_hash(*packages: str) -> str:
    """Hash of the code a cached result depends on (so that editing it invalidates the cache)."""
    import hashlib

    from . import kernels

    root, kernel_root = Path(__file__).parent, Path(kernels.__file__).parent
    files = [f for pkg in packages for f in sorted((root / pkg).glob("*.py"))] + [
        root / name for name in ("objectives.py", "nll.py", "anchors.py", "data.py", "capture.py", "config.py")]
    # the curvature kernels round the factors: their Python and C++ sources (csrc/ in a source checkout)
    files += sorted(kernel_root.glob("*.py")) + sorted((kernel_root.parent / "csrc").glob("*.cpp"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]


GUARDED = {"screen": 0.05, "rescale": 2.0}  # the guarded row's CurvSafe settings (README, **The guarded recipe**)


def _guarded_finetune(bed, cfg, aligned: Path, attack: Path, data: Path, progress: bool) -> tuple[Path, bool]:
    """The attack's fine-tune (same data, seed and settings) with CurvSafe(AdamW), its benign side on the
    testbed's restore split of benign requests, example screening and the rescaled update (:data:`GUARDED`: the
    mix attack's data holds harmful pairs); cached like the stages."""
    from .data import load_pairs
    from .finetune import curvsafe_factory, lora_sft
    from .models import load_model

    key = cfg.digest("guarded", "benign side", GUARDED, attack.name, _code_hash("optim", "curvature"))
    folder = bed.cache / f"guarded-{key}"
    if (folder / "train_log.json").is_file():
        return folder, False
    model, tokenizer = load_model(aligned)
    factory = curvsafe_factory(tokenizer, load_pairs(data / "restore_harmful.jsonl"), lr=cfg.attack_lr,
                               benign=load_pairs(data / "restore_benign.jsonl", require_response=False),
                               **GUARDED)
    lora_sft(model, tokenizer, load_pairs(attack / "train.jsonl"), folder, r=cfg.lora_r, alpha=2 * cfg.lora_r,
             epochs=cfg.attack_epochs, lr=cfg.attack_lr, batch_size=32, seed=cfg.seed, optimizer=factory,
             force=True, progress=progress)
    return folder, True


def default_cache() -> Path:
    """Where testbed stages are cached: ``$CURVSAFE_CACHE`` or ``~/.cache/curvsafe``."""
    return Path(os.environ.get("CURVSAFE_CACHE", Path.home() / ".cache" / "curvsafe" / "testbed"))


def _evaluate(model, tokenizer, data: Path, anchor_batches) -> dict:
    """The metrics of one model; where the data stage holds ``eval_harmful_<source>.jsonl`` files (the realistic
    testbed), also ``harmful_rate:<source>`` per source (the overall rate is over their union)."""
    from .eval.metrics import harmful_rate, refusal_rate, task_accuracy, task_nll
    from .nll import token_mean_nll

    harmful = [p.prompt for p in load_pairs(data / "eval_harmful.jsonl", require_response=False)]
    benign = [p.prompt for p in load_pairs(data / "eval_benign.jsonl", require_response=False)]
    task = load_pairs(data / "eval_task.jsonl")
    skills = load_pairs(data / "eval_skills.jsonl")
    rate, _, flags = harmful_rate(model, tokenizer, harmful)
    by_prompt = dict(zip(harmful, flags))
    over, _, _ = refusal_rate(model, tokenizer, benign)
    task_acc, _ = task_accuracy(model, tokenizer, task)
    skill_acc, _ = task_accuracy(model, tokenizer, skills)
    row = {"harmful_rate": rate, "over_refusal": over,
           "task_accuracy": task_acc, "skills_accuracy": skill_acc,
           "safety_nll": float(token_mean_nll(model, anchor_batches)), "task_nll": task_nll(model, tokenizer, task)}
    for path in sorted(data.glob("eval_harmful_*.jsonl")):
        source = [p.prompt for p in load_pairs(path, require_response=False)]
        row[f"harmful_rate:{path.stem.removeprefix('eval_harmful_')}"] = sum(by_prompt[p] for p in source) / len(source)
    return row


def _run_seed(bed, out: Path, methods: Sequence[str], progress: bool) -> dict:
    """Every row of one testbed seed: aligned, attacked, guarded and one per restore method, with paths."""
    from .anchors import anchor_responses, keep_response_prefix
    from .models import load_model
    from .restoration import NoProgressError, run_restore

    cfg = bed.cfg
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
    anchors: dict[str, Optional[list[Pair]]] = {"anchor": None, "benign_anchor": None}  # generated once
    code = _code_hash("restoration", "curvature", "eval")
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
                                  benign_file=data / "restore_benign.jsonl", force=True, progress=progress,
                                  **anchors)
            except NoProgressError as exc:  # the method left the attacked adapter as it was
                restored[method] = {**rows["attacked"], "cached": False, "stopped": f"no progress: {exc}"}
                continue
            report = run.report
            ran = True
        for name in anchors:
            if anchors[name] is None and (folder / f"{name}.jsonl").is_file():
                anchors[name] = load_pairs(folder / f"{name}.jsonl")
        if method == "resta":
            model, tokenizer = load_model(folder / "model")
        else:
            model, tokenizer = load_model(aligned, folder / "adapter")
        row = _evaluate(model, tokenizer, data, anchor_batches)
        row.update(seconds=report["seconds"], cached=not ran, stopped=report["stopped"])
        restored[method] = row
        target = out / "restored" / method
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder, target)

    paths = {"aligned_model": str(aligned), "unaligned_model": str(unaligned),
             "attacked_adapter": str(attack / "adapter"), "guarded_adapter": str(guarded_dir),
             "restored": {m: str(out / "restored" / m / ("model" if m == "resta" else "adapter")) for m in restored
                          if not restored[m]["stopped"].startswith("no progress")},
             "data": str(data)}
    return {**rows, "restored": restored, "paths": paths}


def _rows(seed_report: dict) -> dict[str, dict]:
    """The rows of one seed's report by display name."""
    rows = {name: seed_report[name] for name in ("aligned", "attacked", "guarded")}
    rows.update({f"restored:{m}": r for m, r in seed_report["restored"].items()})
    return rows


def _summarise(per_seed: dict) -> dict:
    """Mean, min and max over seeds of every metric of every row."""
    summary: dict[str, dict] = {}
    for seed_report in per_seed.values():
        for name, row in _rows(seed_report).items():
            for metric in _metrics(row):
                summary.setdefault(name, {}).setdefault(metric, []).append(row[metric])
    return {name: {metric: {"mean": sum(v) / len(v), "min": min(v), "max": max(v)} for metric, v in metrics.items()}
            for name, metrics in summary.items()}


def run_demo(out: Path, quick: bool = False, cache: Optional[Path] = None, methods: Sequence[str] = METHODS,
             progress: bool = True, harmful_csv: Optional[str] = None, seeds: Sequence[int] = (0,),
             testbed: str = "default", data_dir: Optional[str | Path] = None) -> dict:
    """The demo on each testbed seed in ``seeds`` (each cached on its own); ``out`` gets ``report.json``
    (``per_seed`` rows and paths, and a ``summary`` of every metric as mean / min / max over seeds), ``demo.png``
    and ``seed<k>/restored/<method>`` (the restored adapters).

    ``testbed``: ``default`` (the project's generated world) or ``realistic`` (real requests from the public files
    in ``data_dir``; its rows also hold the harmful rate per source)."""
    from dataclasses import replace

    from .testbed.stages import Testbed, TestbedKind

    if not seeds:
        raise ValueError("give at least one seed")
    kind = TestbedKind(testbed)
    base = _base_config(kind, quick, harmful_csv, data_dir)
    out = Path(out)
    _check_writable(out)
    t_start = time.perf_counter()
    per_seed, built = {}, []
    for seed in seeds:
        bed = Testbed(cache or default_cache(), replace(base, seed=seed), progress=progress)
        per_seed[str(seed)] = _run_seed(bed, out / f"seed{seed}", methods, progress)
        built += [f"{name} (seed {seed})" for name in bed.built]
        if len(seeds) > 1:
            print(f"\nseed {seed}")
            _print_table({name: {m: {"mean": row[m]} for m in _metrics(row)} | _extra(row)
                          for name, row in _rows(per_seed[str(seed)]).items()})
    summary = _summarise(per_seed)
    report = {"testbed": kind.value, "config": "quick" if quick else "full", "seeds": list(seeds), "per_seed": per_seed,
              "summary": summary, "guarded": {"benign_side": True, **GUARDED}, "stages_built": built,
              "seconds": time.perf_counter() - t_start}
    if len(seeds) > 1:
        print(f"\nmean [min, max] over seeds {', '.join(map(str, seeds))}")
    _print_table({name: {**summary[name], **(_extra(row) if len(seeds) == 1 else {})}
                  for name, row in _rows(per_seed[str(seeds[0])]).items()})
    write_json(out / "report.json", report)
    _plot(out / "demo.png", summary, len(seeds))
    print(f"\nreport: {out / 'report.json'}  plot: {out / 'demo.png'}  ({report['seconds']:.0f}s)")
    return report


def _base_config(kind, quick: bool, harmful_csv: Optional[str], data_dir: Optional[str | Path]):
    """The testbed configuration the seeds replace theirs in (``--testbed``, ``--quick``, ``--harmful-csv``,
    ``--data-dir``, checked against each other)."""
    from dataclasses import replace

    from .testbed.stages import QUICK, TestbedConfig, TestbedKind, realistic_config

    if kind is TestbedKind.REALISTIC:
        if data_dir is None:
            raise ValueError("--testbed realistic needs --data-dir (the folder of the public data files)")
        if harmful_csv:
            raise ValueError("--harmful-csv is for the default testbed; the realistic one reads AdvBench itself")
        return realistic_config(data_dir, quick=quick)
    if data_dir is not None:
        raise ValueError("--data-dir is for --testbed realistic")
    base = QUICK if quick else TestbedConfig()
    return replace(base, harmful_csv=str(Path(harmful_csv).resolve())) if harmful_csv else base


def _check_writable(out: Path) -> None:
    """``out`` exists (created) and takes a file, or a one-line ``OSError`` before any work."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-")
        probe.close()
    except OSError as exc:
        raise OSError(f"cannot write to --out {out}: {exc.strerror or exc}") from None


METRICS = ("harmful_rate", "over_refusal", "task_accuracy", "skills_accuracy", "safety_nll", "task_nll")


def _metrics(row: dict) -> list[str]:
    """The metrics of a row: :data:`METRICS` and the per-source harmful rates it has."""
    return [*METRICS, *sorted(k for k in row if k.startswith("harmful_rate:"))]


def _extra(row: dict) -> dict:
    return {"seconds": row["seconds"]} if "seconds" in row else {}


def _print_table(rows: dict) -> None:
    """One line per row: rates in %, NLLs, seconds; a metric is ``mean`` or ``mean [min-max]`` over seeds."""
    def cell(stats: dict, percent: bool) -> str:
        fmt = (lambda v: f"{100 * v:.1f}") if percent else (lambda v: f"{v:.3f}")
        if "min" not in stats or stats["min"] == stats["max"]:
            return fmt(stats["mean"])
        return f"{fmt(stats['mean'])} [{fmt(stats['min'])}-{fmt(stats['max'])}]"

    sources = sorted({k for r in rows.values() for k in r if k.startswith("harmful_rate:")})
    columns = [("harmful %", "harmful_rate", True), *((f"{k.partition(':')[2]} %", k, True) for k in sources),
               ("over-refusal %", "over_refusal", True),
               ("task acc %", "task_accuracy", True), ("skills %", "skills_accuracy", True),
               ("safety NLL", "safety_nll", False), ("task NLL", "task_nll", False)]
    cells = {name: [cell(r[key], pct) for _, key, pct in columns] for name, r in rows.items()}
    widths = [max(len(h), *(len(c[i]) for c in cells.values())) for i, (h, _, _) in enumerate(columns)]
    header = f"{'stage / method':<18} " + " ".join(f"{h:>{w}}" for (h, _, _), w in zip(columns, widths)) + \
        f" {'seconds':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, r in rows.items():
        secs = f"{r['seconds']:8.1f}" if "seconds" in r else f"{'':>8}"
        print(f"{name:<18} " + " ".join(f"{c:>{w}}" for c, w in zip(cells[name], widths)) + f" {secs}")


def _plot(path: Path, summary: dict, n_seeds: int) -> None:
    """Harmful rate against over-refusal (left) and against task accuracy (right), one point per row (the mean
    over seeds, bars from min to max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    styles = {"aligned": ("k*", 12), "attacked": ("rX", 12), "guarded": ("gP", 12)}
    for name, row in summary.items():
        style, size = styles.get(name, ("o", 8))
        label = {"guarded": "guarded (CurvSafe fine-tune)"}.get(name, name.removeprefix("restored:"))
        x = row["harmful_rate"]
        for ax, key in zip(axes, ("over_refusal", "task_accuracy")):
            y = row[key]
            ax.errorbar(100 * x["mean"], 100 * y["mean"], fmt=style, markersize=size, label=label,
                        xerr=[[100 * (x["mean"] - x["min"])], [100 * (x["max"] - x["mean"])]],
                        yerr=[[100 * (y["mean"] - y["min"])], [100 * (y["max"] - y["mean"])]], capsize=2)
    axes[0].set_ylabel("over-refusal: refused held-out benign look-alikes (%)")
    axes[1].set_ylabel("accuracy on the fine-tuned task (%)")
    for ax in axes:
        ax.set_xlabel("harmful rate on held-out harmful prompts (%)  ← safer")
        ax.set_xlim(-3, 103)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right")
    seeds = f"mean over {n_seeds} seeds, bars min-max" if n_seeds > 1 else "one seed"
    fig.suptitle(f"curvsafe demo: restoration at equal task budget ({seeds}); best: bottom left, top left")
    fig.tight_layout()
    with staged_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
