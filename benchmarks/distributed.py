"""``curvsafe restore`` on 1 rank and on N ranks (``torchrun``) side by side, on the testbed's attacked model.

    python benchmarks/distributed.py --out benchmarks/results [--seeds 0] [--methods lbfgs,kfac,cg,sgd]
                                     [--ranks 2] [--cache DIR] [--fsdp2]

For each seed and method, the same command (default settings: two-sided objective, benign constraint) runs once
as one process and once under ``torchrun --nproc-per-node N`` (gloo on CPU, each rank one thread: the same cores
as the single process's threads). Columns: accepted steps and stop reason of each, the relative difference of
the safety objective and task NLL after the run, the relative error of the N-rank adapter against the 1-rank
one (Frobenius, all LoRA tensors) next to the same error of a 1-rank run on one thread (float32 rounding
alone: other sums in another order), the held-out harmful rate / over-refusal / task accuracy of both, and the
restore time of both (the report's ``seconds``: the restore loop, not loading) with their ratio. ``kfac`` /
``ekfac`` draw their Monte Carlo labels per rank, so only their statistics, not their bits, match.

``--fsdp2``: the N-rank run shards the model with FSDP2 (``restore --fsdp2``), and the
reference column is the N-rank run without sharding instead of the 1-thread run. Sharded, a file whose batches
do not divide among the ranks has its largest batches split (every rank runs as many forwards), so kfac / ekfac
draw other labels than unsharded and, again, only their statistics match; the others match to rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import replace
from datetime import date
from pathlib import Path

# keep benchmarks/ (which holds a kernels.py) off the path: transformers probes for a package called `kernels`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from curvsafe.anchors import anchor_responses, keep_response_prefix  # noqa: E402
from curvsafe.data import load_pairs, make_batches  # noqa: E402
from curvsafe.demo import _evaluate, default_cache  # noqa: E402
from curvsafe.models import load_model  # noqa: E402
from curvsafe.testbed.stages import Testbed, TestbedConfig  # noqa: E402

METRICS = ("harmful_rate", "over_refusal", "task_accuracy")


def restore(ranks: int, data: Path, aligned: Path, adapter: Path, out: Path, method: str,
            threads: int | None = None, extra: tuple = ()) -> dict:
    """One ``curvsafe restore`` run (``ranks`` > 1: under torchrun; ``threads`` per rank, by default this
    process's threads shared out; ``extra``: more options); its report."""
    args = ["restore", "--model", str(aligned), "--adapter", str(adapter), "--harmful",
            str(data / "restore_harmful.jsonl"), "--task", str(data / "restore_task.jsonl"), "--benign",
            str(data / "restore_benign.jsonl"), "--out", str(out), "--method", method, *extra]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
                if ranks > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads or max(1, torch.get_num_threads() // ranks))}
    proc = subprocess.run([*launcher, "-m", "curvsafe.cli", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} on {ranks} rank(s) failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads((out / "report.json").read_text())


def adapter_error(a: Path, b: Path) -> float:
    """``||A - B|| / ||B||`` over every tensor of two saved adapters."""
    x, y = (load_file(folder / "adapter" / "adapter_model.safetensors") for folder in (a, b))
    flat = [torch.cat([t[n].double().flatten() for n in sorted(y)]) for t in (x, y)]
    return float((flat[0] - flat[1]).norm() / flat[1].norm())


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def seed_rows(seed: int, args) -> list[dict]:
    bed = Testbed(args.cache or default_cache(), replace(TestbedConfig(), seed=seed))
    data, aligned, adapter = bed.data(), bed.aligned(), bed.attack("mix") / "adapter"
    model, tok = load_model(aligned)
    prompts = [p.prompt for p in load_pairs(data / "eval_harmful.jsonl", require_response=False)]
    anchor_batches = keep_response_prefix(make_batches(tok, anchor_responses(model, tok, prompts), batch_size=32), 4)
    work = Path(tempfile.mkdtemp(prefix="curvsafe-dist-"))
    rows = []
    for method in args.methods:
        many_options = ("--fsdp2",) if args.fsdp2 else ()
        runs = {n: restore(n, data, aligned, adapter, work / f"{method}-{n}", method,
                           extra=many_options if n > 1 else ()) for n in (1, args.ranks)}
        one, many = runs[1], runs[args.ranks]
        if args.fsdp2:  # the reference: the same ranks, unsharded
            restore(args.ranks, data, aligned, adapter, work / f"{method}-reference", method)
        else:
            restore(1, data, aligned, adapter, work / f"{method}-reference", method, threads=1)
        row = {"seed": seed, "method": method, "ranks": args.ranks,
               "steps": [one["iterations"], many["iterations"]], "stopped": [one["stopped"], many["stopped"]],
               "safety_rel_diff": rel(many["safety_objective"]["after"], one["safety_objective"]["after"]),
               "task_rel_diff": rel(many["task_nll"]["after"], one["task_nll"]["after"]),
               "adapter_rel_err": adapter_error(work / f"{method}-{args.ranks}", work / f"{method}-1"),
               "reference_rel_err": (adapter_error(work / f"{method}-{args.ranks}", work / f"{method}-reference")
                                     if args.fsdp2 else
                                     adapter_error(work / f"{method}-reference", work / f"{method}-1")),
               "seconds": [one["seconds"], many["seconds"]]}
        for n in (1, args.ranks):
            model, tok = load_model(aligned, work / f"{method}-{n}" / "adapter")
            ev = _evaluate(model, tok, data, anchor_batches)
            row[f"eval_{n}"] = {k: ev[k] for k in METRICS}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict], ranks: int, fsdp2: bool) -> str:
    reference = f"{ranks} ranks sharded vs unsharded" if fsdp2 else "same, 1 rank on 1 thread"
    many = f"{ranks} ranks" + (" (FSDP2)" if fsdp2 else "")
    head = (f"| seed | method | steps 1 / {ranks} | stopped (1 / {ranks}) | safety after, rel. diff | task NLL after, "
            f"rel. diff | adapter rel. error | {reference} | harmful / over-refusal / task, 1 rank | "
            f"same, {many} | restore s, 1 / {ranks} (ratio) |")
    lines = [head, "|" + " --- |" * 11]
    for r in rows:
        e1, en = r["eval_1"], r[f"eval_{ranks}"]
        fmt = " / ".join
        lines.append(
            f"| {r['seed']} | {r['method']} | {r['steps'][0]} / {r['steps'][1]} | "
            f"{' / '.join(r['stopped'])} | {r['safety_rel_diff']:.1e} | {r['task_rel_diff']:.1e} | "
            f"{r['adapter_rel_err']:.1e} | {r['reference_rel_err']:.1e} | "
            f"{fmt(f'{100 * e1[k]:.1f}' for k in METRICS)} | {fmt(f'{100 * en[k]:.1f}' for k in METRICS)} | "
            f"{r['seconds'][0]:.1f} / {r['seconds'][1]:.1f} "
            f"({r['seconds'][1] / r['seconds'][0]:.2f}x) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--methods", default="lbfgs,kfac,cg,sgd")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--fsdp2", action="store_true", help="shard the N-rank runs with FSDP2")
    args = parser.parse_args()
    args.methods = args.methods.split(",")
    rows = [row for seed in map(int, args.seeds.split(",")) for row in seed_rows(seed, args)]
    stem = args.out / (f"distributed_cpu_{date.today()}" + ("_fsdp2" if args.fsdp2 else ""))
    stem.with_suffix(".json").write_text(json.dumps({"rows": rows, "torch": torch.__version__,
                                                      "machine": platform.processor() or platform.machine(),
                                                      "threads": torch.get_num_threads(), "fsdp2": args.fsdp2},
                                                     indent=2))
    sharded = " --fsdp2" if args.fsdp2 else ""
    text = (f"# restore on 1 rank vs {args.ranks} ranks (torchrun, gloo{', FSDP2' if args.fsdp2 else ''}), "
            f"{date.today()}\n\n"
            f"`python benchmarks/distributed.py --out {args.out} --seeds {args.seeds} --methods "
            f"{','.join(args.methods)} --ranks {args.ranks}{sharded}`; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads for 1 rank, {max(1, torch.get_num_threads() // args.ranks)} per rank "
            f"for {args.ranks}. Default testbed (attack: 10% harmful mix), default restore settings.\n\n"
            + table(rows, args.ranks, args.fsdp2) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
