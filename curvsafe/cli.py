"""The ``curvsafe`` command line."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import signal
import sys
from dataclasses import fields
from pathlib import Path
from typing import Optional, Sequence

from ._version import __version__
from .config import DTYPES, RESTORE_METHODS, FisherType, KFACApprox, Method, RestoreConfig, TestbedKind

EXIT_ERROR = 2  # bad input or a failure: one line on stderr, nothing written
EXIT_PARTIAL = 3  # restore failed after an accepted step: the last accepted state was written
PAIRS_HELP = ("prompt/response pairs: JSON Lines, a JSON array or CSV (also prompt/completion, chat messages, Alpaca, "
              "AdvBench's goal/target: curvsafe/data.py)")
EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # interrupted: nothing written (an existing --out is left as it was)


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that temporary outputs are removed on the way out."""


def cmd_factors(args: argparse.Namespace) -> int:
    """Fit K-FAC / EK-FAC factors or the Fisher diagonal of a local model on a data file and save them."""
    from .curvature import EKFAC, KFAC, empirical_fisher_diagonal
    from .data import load_pairs, make_batches
    from .io import check_out, save_torch
    from .models import fit_max_length, load_model

    out = check_out(args.out, args.force, inputs=[args.model, args.adapter, args.data])
    pairs = load_pairs(args.data)
    model, tokenizer = load_model(args.model, args.adapter, dtype=args.dtype, device=args.device)
    batches = make_batches(tokenizer, pairs, batch_size=args.batch_size,
                           max_length=fit_max_length(args.max_length, model), limit=args.limit)
    modules = args.modules or None
    if args.method == "diag":
        state = {"method": "diag", "diagonal": empirical_fisher_diagonal(model, batches, modules, progress=True)}
        summary = {n: float(t.sum()) for n, t in state["diagonal"].items()}
    else:
        cls = EKFAC if args.method == "ekfac" else KFAC
        op = cls(model, modules, fisher_type=args.fisher_type, kfac_approx=args.approx, seed=args.seed,
                 progress=True).fit(batches)
        state = {"method": args.method, **op.state_dict()}
        summary = {n: float(f.A.trace() * f.G.trace()) for n, f in op.factors.items()}
    save_torch(state, out)
    width = max(len(n) for n in summary)
    print(f"{'block':<{width}}  trace")
    for name, value in summary.items():
        print(f"{name:<{width}}  {value:.4e}")
    print(f"saved {args.method} curvature of {len(summary)} blocks to {out}")
    return 0


def _before_after(name: str, quantity: dict) -> str:
    aligned = quantity.get("aligned")
    return (f"{name} {quantity['before']:.4f} -> {quantity['after']:.4f}"
            + ("" if aligned is None else f" (aligned {aligned:.4f})"))


def cmd_restore(args: argparse.Namespace) -> int:
    """Curvature-aware safety restoration of a fine-tuned adapter (or a baseline); data parallel when started by
    ``torchrun`` / ``accelerate launch`` (rank 0 logs, prints and writes)."""
    import torch.distributed as dist

    from .ranks import init_from_env, is_main, launched, leave_group
    from .restoration import run_restore

    owns_group = launched() and not dist.is_initialized()
    init_from_env(args.device)
    main_rank = is_main()  # asked now: the group is gone after the run
    if not main_rank:
        logging.getLogger("curvsafe").setLevel(logging.WARNING)
    config = RestoreConfig(**{f.name: getattr(args, f.name) for f in fields(RestoreConfig)})
    try:
        r = run_restore(args.model, args.adapter, args.harmful, args.task, args.out, config,
                        benign_file=args.benign, unaligned_model=args.unaligned_model,
                        aligned_model=args.aligned_model, force=args.force).report
        gc.collect()  # the model is freed before the group is left (an FSDP2-sharded one holds the group)
    finally:
        if owns_group:
            leave_group()
    if not main_rank:
        return 0
    terms = [_before_after(k.removesuffix("_nll") + " NLL", r[k]) for k in ("anchor_nll", "refusal_nll",
                                                                            "harmful_nll", "benign_nll") if k in r]
    if "over_refusal" in r:
        o = r["over_refusal"]
        terms.append(f"refuses {o['before']:.1%} -> {o['after']:.1%} of {o['prompts']} benign prompts (aligned "
                     f"{o['aligned']:.1%})")
    print(f"{r['method']}: {_before_after('safety objective', r['safety_objective'])}; "
          + "; ".join(terms + [f"task NLL {r['task_nll']['before']:.4f} -> {r['task_nll']['after']:.4f} "
                               f"(budget {r['task_nll']['budget']:.4f})"]))
    print(f"{r['iterations']} accepted steps in {r['seconds']:.1f}s; stopped: {r['stopped']} ({r['stop_detail']})")
    print(f"wrote {args.out}")
    if r["error"]:
        print(f"curvsafe restore: error after {r['iterations']} accepted steps ({r['error']}); the last accepted "
              f"state was written to {args.out}", file=sys.stderr)
        return EXIT_PARTIAL
    return 0


PLAN_METHODS = (*RESTORE_METHODS, "curvsafe")


def _method_list(text: str) -> list[str]:
    """``--method`` of ``plan``: one method or several, comma-separated."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    wrong = [m for m in methods if m not in PLAN_METHODS]
    if wrong or not methods:
        raise argparse.ArgumentTypeError(f"invalid method {', '.join(wrong) or repr(text)} (choose from "
                                         f"{', '.join(PLAN_METHODS)})")
    return methods


def cmd_plan(args: argparse.Namespace) -> int:
    """Memory and cost per restore method and for CurvSafe, from config.json (+ adapter_config.json) alone."""
    from .curvature.lowrank import LowRank
    from .plan import RANKED_METHODS, PlanSettings, estimate, gib, largest_rank, meta_model

    if args.curvature_budget is not None and args.dense:
        raise SystemExit("curvsafe plan: --curvature-budget chooses the rank of truncated factors; not with --dense")
    low = None if args.dense else LowRank(max_dense_dim=args.max_dense_dim, rank=args.rank,
                                          oversample=args.oversample, probes=args.probes, passes=args.passes)
    settings = PlanSettings(batch_size=args.batch_size, seq_len=args.seq_len, task_batches=args.task_batches,
                            safety_batches=args.safety_batches, low_rank=low, ggn_rows=args.ggn_rows,
                            shards=args.shards, screen=args.screen, curvature_batches=args.curvature_batches)
    model = meta_model(args.model, args.adapter, args.dtype)
    plan = estimate(model, settings)
    if args.method:
        chosen = {m for group in args.method for m in group}
        plan.methods = {m: p for m, p in plan.methods.items() if m in chosen}
    ranks = None
    if args.curvature_budget is not None:  # per K-FAC-based method: the largest --rank whose curvature fits
        ranks = {m: largest_rank(model, low, m, args.curvature_budget) for m in RANKED_METHODS if m in plan.methods}
    if args.json:
        print(json.dumps({**plan.to_json(), **({} if ranks is None else {"largest_rank": ranks})}, indent=2))
        return 0
    print(plan.table())
    if ranks is not None:
        print(f"largest --rank whose curvature fits {gib(args.curvature_budget)}: "
              + ", ".join(f"{m} {'none' if r is None else r}" for m, r in ranks.items()))
    if args.max_memory is not None:
        fits = [m for m, p in plan.methods.items() if p.peak_bytes <= args.max_memory]
        print(f"fit in {gib(args.max_memory)}: {', '.join(fits) if fits else 'none'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Harmful rate and over-refusal (judge) and task accuracy (exact match) of a model, every response saved."""
    from .data import load_pairs
    from .eval import evaluate_model, load_judge
    from .io import check_out, write_json
    from .models import load_model

    if not (args.harmful or args.benign or args.task):
        raise ValueError("give at least one of --harmful, --benign, --task")
    out = check_out(args.out, args.force, inputs=[args.model, args.adapter, args.harmful, args.benign, args.task])
    judge = load_judge(args.judge)

    def prompts(path):
        return [p.prompt for p in load_pairs(path, require_response=False)][:args.limit] if path else []

    harmful, benign = prompts(args.harmful), prompts(args.benign)
    task = load_pairs(args.task)[:args.limit] if args.task else []
    model, tokenizer = load_model(args.model, args.adapter, dtype=args.dtype, device=args.device)
    report = evaluate_model(model, tokenizer, harmful, task, benign_prompts=benign, judge=judge,
                            max_new_tokens=args.max_new_tokens)
    report.update(model=str(args.model), adapter=str(args.adapter) if args.adapter else None, judge=args.judge)
    write_json(out, report)
    parts = []
    if harmful:
        parts.append(f"harmful rate {report['harmful_rate']:.3f} on {len(harmful)} prompts")
    if benign:
        parts.append(f"over-refusal {report['over_refusal']:.3f} on {len(benign)} benign prompts")
    if task:
        parts.append(f"task accuracy {report['task_accuracy']:.3f} on {len(task)} (NLL {report['task_nll']:.4f})")
    print("; ".join(parts))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """LoRA SFT with the HF Trainer."""
    from .finetune import finetune

    log = finetune(args.model, args.data, args.out, optimizer=args.optimizer, safety=args.safety,
                   benign=args.benign, monitor=args.monitor, screen=args.screen, rescale=args.rescale, r=args.r,
                   alpha=args.alpha, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                   max_length=args.max_length, seed=args.seed, force=args.force)
    print(f"trained {log['steps']} steps, mean loss {log['train_loss']:.4f}; adapter in {args.out}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """Loss correlations, Hessian eigenspace overlap and loss landscapes of aligned vs fine-tuned."""
    from .analyze import analyze

    r = analyze(args.model, args.adapter, args.harmful, args.benign, args.out, k=args.k, grid=args.grid,
                limit=args.limit, force=args.force)
    for name, c in r["correlation"].items():
        print(f"{name:8s} loss correlation aligned vs fine-tuned: Pearson {c['pearson']:.3f}, "
              f"Spearman {c['spearman']:.3f} (n={c['n']})")
    h = r["hessian"]
    print(f"harmful-loss Hessian top-{h['k']} eigenspaces: overlap {h['overlap']:.3f} "
          f"(unrelated subspaces: {h['random_overlap_expected']:.1e}); principal angles "
          f"{', '.join(f'{a:.0f}' for a in h['principal_angles_deg'])} degrees")
    print(f"wrote {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The end-to-end example on the testbed (``curvsafe demo``)."""
    from .demo import run_demo

    run_demo(Path(args.out), quick=args.quick, cache=Path(args.cache) if args.cache else None,
             harmful_csv=args.harmful_csv, seeds=args.seeds, testbed=args.testbed, data_dir=args.data_dir)
    return 0


def _restore_settings(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`RestoreConfig` field, with its default and help text."""
    defaults = RestoreConfig()
    special = {"method": dict(choices=[m.value for m in Method]),
               "benign_budget": dict(type=_budget, metavar="NATS|off"),
               "params": dict(nargs="*"), "dtype": dict(choices=list(DTYPES)),
               "max_memory": dict(type=_memory, metavar="SIZE"), "fsdp2": dict(action="store_true"),
               "sketch_passes": dict(type=int, choices=[1, 2])}
    types = {"task_budget": float, "task_budget_abs": float, "damping": float, "iterations": int, "select_top": int,
             "batch_size": int, "max_length": int, "limit": int, "ggn_rows": int, "curvature_seed": int,
             "shards": int, "max_dense_dim": int, "rank": int, "curvature_batches": int}
    for f in fields(RestoreConfig):
        kwargs = {"default": getattr(defaults, f.name), "help": RestoreConfig.help(f.name)}
        kwargs.update(special.get(f.name, {"type": types[f.name]} if f.name in types else {}))
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def _budget(text: str) -> Optional[float]:
    if text == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of nats or 'off', got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a budget >= 0, got {text!r}")
    return value


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"repeated seed in {text!r}")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    """The ``curvsafe`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="curvsafe", description="Curvature-aware safety restoration for "
                                     "fine-tuned LLMs.")
    parser.add_argument("--version", action="version", version=f"curvsafe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    f = sub.add_parser("factors", help="fit K-FAC / EK-FAC factors or the Fisher diagonal and save them")
    f.add_argument("--model", required=True, help="local Hugging Face model folder")
    f.add_argument("--adapter", help="PEFT adapter folder (curvature of its LoRA blocks by default)")
    f.add_argument("--data", required=True, help=PAIRS_HELP)
    f.add_argument("--out", required=True, help="output .pt file")
    f.add_argument("--method", choices=["kfac", "ekfac", "diag"], default="kfac")
    f.add_argument("--fisher-type", choices=[FisherType.EMPIRICAL.value, FisherType.MC.value], default="empirical")
    f.add_argument("--approx", choices=[a.value for a in KFACApprox], default="expand")
    f.add_argument("--modules", nargs="*", help="module names or glob patterns (default: LoRA or all linear)")
    f.add_argument("--batch-size", type=int, default=8)
    f.add_argument("--max-length", type=int, default=256)
    f.add_argument("--limit", type=int, help="use only the first N examples")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    f.add_argument("--device", default="cpu")
    f.add_argument("--force", action="store_true", help="overwrite --out")
    f.set_defaults(func=cmd_factors)

    r = sub.add_parser("restore", help="restore safety of a fine-tuned adapter (curvature-aware, or a baseline)")
    r.add_argument("--model", required=True, help="local HF folder of the aligned base model (without --adapter: "
                   "the fully fine-tuned model)")
    r.add_argument("--adapter", help="the fine-tuned PEFT LoRA adapter (never modified); omit for a full fine-tune")
    r.add_argument("--aligned-model", help="full fine-tune only: the model before fine-tuning (the anchor)")
    r.add_argument("--harmful", required=True, help="harmful prompts (JSONL prompt[/response] or AdvBench CSV)")
    r.add_argument("--task", required=True, help="the fine-tuning task's prompt/response JSONL")
    r.add_argument("--out", required=True, help="output folder (adapter/, report.json, anchor.jsonl)")
    r.add_argument("--benign", help="benign requests the aligned model answers (JSONL prompts, e.g. look-alikes of "
                   "the harmful ones): the default objective becomes two-sided and the report shows over-refusal")
    r.add_argument("--unaligned-model", help="pre-alignment weights (safelora, resta)")
    r.add_argument("--force", action="store_true", help="replace --out")
    _restore_settings(r)
    r.set_defaults(func=cmd_restore)

    p = sub.add_parser("plan", help="memory and cost per method from config.json alone (no weights needed)")
    p.add_argument("--model", required=True, help="HF model folder (config.json is enough)")
    p.add_argument("--adapter", help="PEFT LoRA adapter folder (adapter_config.json is enough)")
    p.add_argument("--method", nargs="*", type=_method_list, metavar="METHOD",
                   help=f"methods to show, space- or comma-separated, of {', '.join(PLAN_METHODS)} (default: all "
                        "restore methods and the curvsafe optimizer)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (one training step)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--task-batches", type=int, default=1, help="task data the restore uses, in batches")
    p.add_argument("--safety-batches", type=int, default=1, help="safety data the restore uses, in batches")
    p.add_argument("--curvature-batches", type=int, help="of the task batches, the most the restore fits its "
                   "curvature on (restore's --curvature-batches; default: all)")
    p.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "float16"],
                   help="weights' dtype (default: the config's torch_dtype, else float32)")
    p.add_argument("--max-dense-dim", type=int, default=2048, help="larger K-FAC factors are truncated")
    p.add_argument("--rank", type=int, default=256, help="eigenvectors kept per truncated factor")
    p.add_argument("--oversample", type=int, default=128, help="extra sketch columns per truncated factor")
    p.add_argument("--probes", type=int, default=16, help="probe columns per truncated factor (the estimate of "
                   "its left-out eigenvalues)")
    p.add_argument("--passes", type=int, default=1, choices=[1, 2], help="passes per K-FAC fit of truncated factors "
                   "(2: a second pass refines each sketch, LowRank.passes)")
    p.add_argument("--dense", action="store_true", help="every factor dense (no memory bound)")
    p.add_argument("--ggn-rows", type=int, help="lbfgs / cg: rows per pass of each GGN-vector product "
                   "(restore's --ggn-rows)")
    p.add_argument("--shards", type=int, default=1, help="ranks the weights are sharded over with FSDP2 (restore "
                   "--fsdp2, CurvSafe under fully_shard): memory per rank")
    p.add_argument("--screen", action="store_true", help="curvsafe with example screening (finetune --screen): "
                   "its per-example gradients, batch-size x the adapter, are held until the step")
    p.add_argument("--max-memory", type=_memory, metavar="SIZE", help="also say which methods fit in SIZE")
    p.add_argument("--curvature-budget", type=_memory, metavar="SIZE", help="also give, for kfac, ekfac and "
                   "curvsafe, the largest --rank whose curvature fits SIZE (restore's --rank; JSON: largest_rank)")
    p.add_argument("--json", action="store_true", help='print {"methods": {METHOD: {"curvature_bytes", '
                   '"peak_bytes", "steps_per_iteration"}}, ...}')
    p.set_defaults(func=cmd_plan)

    e = sub.add_parser("eval", help="harmful rate, over-refusal and task accuracy, every response saved")
    e.add_argument("--model", required=True)
    e.add_argument("--adapter")
    e.add_argument("--harmful", help="harmful prompts (JSONL or AdvBench CSV): harmful rate")
    e.add_argument("--benign", help="benign prompts (JSONL): over-refusal, the refusal rate with the same judge")
    e.add_argument("--task", help="task prompt/response JSONL (exact-match accuracy)")
    e.add_argument("--out", required=True, help="output JSON file")
    e.add_argument("--judge", default="keyword", help="keyword (Zou et al.'s list) or module:callable")
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.add_argument("--limit", type=int)
    e.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    e.add_argument("--device", default="cpu")
    e.add_argument("--force", action="store_true")
    e.set_defaults(func=cmd_eval)

    t = sub.add_parser("finetune", help="LoRA SFT of a local model with the HF Trainer")
    t.add_argument("--model", required=True)
    t.add_argument("--data", required=True, help=PAIRS_HELP)
    t.add_argument("--out", required=True, help="adapter output folder")
    t.add_argument("--optimizer", default="adamw", choices=["adamw", "curvsafe"])
    t.add_argument("--safety", help="harmful prompts for --optimizer curvsafe")
    t.add_argument("--benign", help="benign prompts whose answers --optimizer curvsafe keeps (no over-refusal)")
    t.add_argument("--monitor", help="held-out harmful prompts for --optimizer curvsafe, never fitted: the rise of "
                   "their anchor NLL at each refresh is logged as curvsafe_monitor (does the protection carry over?)")
    t.add_argument("--screen", type=float, metavar="COS",
                   help="--optimizer curvsafe: leave out of each step the training examples whose gradient points "
                   "against the safety gradient with a cosine above COS (CurvSafe's screen; default: off)")
    t.add_argument("--rescale", type=float, metavar="X",
                   help="--optimizer curvsafe: scale each projected update back toward AdamW's step length, by at "
                   "most X (CurvSafe's rescale; default: 1, off; the demo's guarded row: --screen 0.05 --rescale 2)")
    t.add_argument("--r", type=int, default=8)
    t.add_argument("--alpha", type=int, default=16)
    t.add_argument("--epochs", type=float, default=3)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--max-length", type=int, default=128)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--force", action="store_true")
    t.set_defaults(func=cmd_finetune)

    a = sub.add_parser("analyze", help="geometry of drift: loss correlations, Hessian eigenspaces, landscapes")
    a.add_argument("--model", required=True, help="aligned base model folder")
    a.add_argument("--adapter", required=True, help="fine-tuned PEFT adapter")
    a.add_argument("--harmful", required=True, help="harmful prompt/response JSONL (or AdvBench CSV)")
    a.add_argument("--benign", required=True, help="benign prompt/response JSONL")
    a.add_argument("--out", required=True, help="output folder (analysis.json, *.png)")
    a.add_argument("--k", type=int, default=5, help="Hessian eigenpairs per model")
    a.add_argument("--grid", type=int, default=9, help="2-D landscape grid size")
    a.add_argument("--limit", type=int, default=64, help="examples per data file")
    a.add_argument("--force", action="store_true", help="replace --out")
    a.set_defaults(func=cmd_analyze)

    d = sub.add_parser("demo", help="run the end-to-end example on a model the project builds itself")
    d.add_argument("--out", default="out/demo", help="output folder")
    d.add_argument("--quick", action="store_true", help="smaller, faster configuration")
    d.add_argument("--cache", help="stage cache folder (default: $CURVSAFE_CACHE or ~/.cache/curvsafe/testbed)")
    d.add_argument("--harmful-csv", help="AdvBench CSV whose goals replace the testbed's harmful prompts "
                   "(e.g. ../shared/data/advbench_harmful_behaviors.csv)")
    d.add_argument("--seeds", type=_seeds, default=(0,), help="testbed seeds, e.g. 0,1,2 (each built and cached "
                   "on its own; the table shows mean [min-max])")
    d.add_argument("--testbed", choices=[k.value for k in TestbedKind], default=TestbedKind.DEFAULT.value,
                   help="default: the project's own generated data; realistic: real AdvBench, BeaverTails and "
                   "Alpaca requests read from --data-dir (BPE tokenizer, larger model; ~15 min cold per seed)")
    d.add_argument("--data-dir", help="folder of the realistic testbed's public files (e.g. ../shared/data)")
    d.set_defaults(func=cmd_demo)
    return parser


def _memory(text: str) -> int:
    from .plan import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Formatter(logging.Formatter):
    """``curvsafe CMD: message`` for information, ``curvsafe CMD: warning: message`` for warnings."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        kind = "warning: " if record.levelno >= logging.WARNING else ""
        return f"{self.prefix}: {kind}{record.getMessage()}"


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def _on_sigterm(signum, frame):
    raise Terminated()


def _rank_tag() -> str:
    """`` [rank R/W]`` in a run started by a launcher with several ranks, else empty."""
    import os

    from .ranks import launched

    return f" [rank {os.environ.get('RANK', '?')}/{os.environ['WORLD_SIZE']}]" if launched() else ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command. Exit codes: 0 done, 2 error (one line on stderr), 3 ``restore`` failed after an accepted
    step (its last accepted state written), 130 / 143 interrupted by SIGINT / SIGTERM (nothing written)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    prefix = f"curvsafe {args.command}"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(prefix))
    package_log = logging.getLogger("curvsafe")
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO if args.command == "restore" else logging.WARNING)  # restore: its plan
    package_log.propagate = False
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave SIGTERM alone
        previous = None
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted (SIGINT)", file=sys.stderr)
        return EXIT_SIGINT
    except Terminated:
        print(f"{prefix}: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_SIGTERM
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, FloatingPointError, OSError,
            MemoryError) as exc:
        print(f"{prefix}{_rank_tag()}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        package_log.removeHandler(handler)
        package_log.propagate = True


if __name__ == "__main__":
    sys.exit(main())
