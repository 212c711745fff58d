"""Restore methods side by side on the testbed's attacked model, for each safety objective.

    python benchmarks/restore.py --out benchmarks/results [--quick] [--cache DIR]

Same fine-tuned model, data, task budget and iteration cap for every method. Columns: safety-loss change,
task-loss change (and budget), harmful rate on held-out harmful prompts, task accuracy, seconds per restore
iteration relative to one training step of the adapter (forward + backward + AdamW step on one task batch of the
same size), all measured in this process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# keep benchmarks/ (which holds a kernels.py) off the path: transformers probes for a package called `kernels`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from curvsafe.data import Pair, load_pairs, make_batches  # noqa: E402
from curvsafe.demo import _evaluate, default_cache  # noqa: E402
from curvsafe.models import load_model  # noqa: E402
from curvsafe.objectives import anchor_responses, keep_response_prefix  # noqa: E402
from curvsafe.restoration import METHODS, NoProgressError, run_restore  # noqa: E402
from curvsafe.testbed.corpus import World  # noqa: E402
from curvsafe.testbed.stages import QUICK, Testbed, TestbedConfig  # noqa: E402

OBJECTIVES = ("anchor", "refusal", "harmful")


def training_step_seconds(aligned: Path, adapter: Path, task_file: Path, repeats: int = 7) -> float:
    model, tok = load_model(aligned, adapter, trainable_adapter=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    (batch,) = make_batches(tok, load_pairs(task_file)[:16], batch_size=16)
    model.train()
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--iterations", type=int, default=8)
    args = parser.parse_args()
    cfg = QUICK if args.quick else TestbedConfig()
    bed = Testbed(args.cache or default_cache(), cfg)
    data, aligned, attack = bed.data(), bed.aligned(), bed.attack("mix") / "adapter"
    unaligned = bed.unaligned()

    work = Path(tempfile.mkdtemp(prefix="curvsafe-bench-"))
    world = World(cfg.seed)
    harmful = load_pairs(data / "restore_harmful.jsonl")
    refusals = [Pair(p.prompt, world.rng.choice(["I cannot help with that .", "Sorry , I cannot assist with this "
                                                                                "request ."])) for p in harmful]
    (work / "refusal.jsonl").write_text("".join(json.dumps({"prompt": p.prompt, "response": p.response}) + "\n"
                                                for p in refusals))
    files = {"anchor": data / "restore_harmful.jsonl", "harmful": data / "restore_harmful.jsonl",
             "refusal": work / "refusal.jsonl"}

    model, tok = load_model(aligned)
    prompts = [p.prompt for p in load_pairs(data / "eval_harmful.jsonl", require_response=False)]
    anchor_batches = keep_response_prefix(make_batches(tok, anchor_responses(model, tok, prompts), batch_size=32), 4)
    step = training_step_seconds(aligned, attack, data / "restore_task.jsonl")
    model, tok = load_model(aligned, attack)
    attacked = _evaluate(model, tok, data, anchor_batches)

    rows = []
    for objective in OBJECTIVES:
        anchor = None
        for method in METHODS:
            out = work / f"{objective}-{method}"
            try:
                run = run_restore(aligned, attack, files[objective], data / "restore_task.jsonl", out,
                                  method=method, objective=objective, iterations=args.iterations,
                                  unaligned_model=unaligned, anchor=anchor)
            except NoProgressError as exc:  # the adapter stays the attacked one
                rows.append({"objective": objective, "method": method, "safety_change": 0.0, "task_change": 0.0,
                             "task_budget": float("nan"), "harmful_rate": attacked["harmful_rate"],
                             "task_accuracy": attacked["task_accuracy"], "iterations": 0, "seconds": float("nan"),
                             "iteration_vs_train_step": float("nan"), "stopped": f"no progress: {exc}"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            if anchor is None and (out / "anchor.jsonl").is_file():
                anchor = load_pairs(out / "anchor.jsonl")
            r = run.report
            ev = _evaluate(run.model, run.tokenizer, data, anchor_batches)
            per_iter = r["seconds"] / max(r["iterations"], 1)
            rows.append({"objective": objective, "method": method,
                         "safety_change": r["safety_objective"]["after"] - r["safety_objective"]["before"],
                         "task_change": r["task_nll"]["after"] - r["task_nll"]["before"],
                         "task_budget": r["task_nll"]["budget"] - r["task_nll"]["before"],
                         "harmful_rate": ev["harmful_rate"], "task_accuracy": ev["task_accuracy"],
                         "iterations": r["iterations"], "seconds": r["seconds"],
                         "iteration_vs_train_step": per_iter / step, "stopped": r["stopped"]})
            print(json.dumps(rows[-1]), flush=True)

    date = time.strftime("%Y-%m-%d")
    lines = [f"# Restore methods on the testbed ({'quick' if args.quick else 'default'} config, {date}, "
             f"{torch.get_num_threads()} CPU threads)", "",
             f"Attacked model: harmful rate {attacked['harmful_rate']:.1%}, task accuracy "
             f"{attacked['task_accuracy']:.1%}. Up to {args.iterations} iterations; one training step = "
             f"{step * 1e3:.1f} ms.", "",
             "| objective | method | Δ safety loss | Δ task loss (budget) | harmful rate | task acc | iters | "
             "s/iter ÷ train step | stopped |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['objective']} | {r['method']} | {r['safety_change']:+.3f} | {r['task_change']:+.4f} "
                     f"({r['task_budget']:.4f}) | {r['harmful_rate']:.1%} | {r['task_accuracy']:.1%} | "
                     f"{r['iterations']} | {r['iteration_vs_train_step']:.0f} | {r['stopped']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"restore_cpu_{date}" + ("_quick" if args.quick else "")
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps({"attacked": attacked, "train_step_seconds": step, "rows": rows},
                                                 indent=2))


if __name__ == "__main__":
    main()
