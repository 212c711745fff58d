"""The ``curvsafe`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from ._version import __version__


def _atomic_save(obj, out: Path, force: bool) -> None:
    import torch

    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cmd_factors(args: argparse.Namespace) -> int:
    """Fit K-FAC / EK-FAC factors or the Fisher diagonal of a local model on a data file and save them."""
    from .curvature import EKFAC, KFAC, empirical_fisher_diagonal
    from .data import load_pairs, make_batches
    from .models import load_model

    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite")
    model, tokenizer = load_model(args.model, args.adapter, dtype=args.dtype, device=args.device)
    batches = make_batches(tokenizer, load_pairs(args.data), batch_size=args.batch_size,
                           max_length=args.max_length, limit=args.limit)
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
    _atomic_save(state, out, args.force)
    width = max(len(n) for n in summary)
    print(f"{'block':<{width}}  trace")
    for name, value in summary.items():
        print(f"{name:<{width}}  {value:.4e}")
    print(f"saved {args.method} curvature of {len(summary)} blocks to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curvsafe", description="Curvature-aware safety restoration for "
                                     "fine-tuned LLMs.")
    parser.add_argument("--version", action="version", version=f"curvsafe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    f = sub.add_parser("factors", help="fit K-FAC / EK-FAC factors or the Fisher diagonal and save them")
    f.add_argument("--model", required=True, help="local Hugging Face model folder")
    f.add_argument("--adapter", help="PEFT adapter folder (curvature of its LoRA blocks by default)")
    f.add_argument("--data", required=True, help="JSONL (prompt, response) or AdvBench CSV (goal, target)")
    f.add_argument("--out", required=True, help="output .pt file")
    f.add_argument("--method", choices=["kfac", "ekfac", "diag"], default="kfac")
    f.add_argument("--fisher-type", choices=["empirical", "mc"], default="empirical")
    f.add_argument("--approx", choices=["expand", "reduce"], default="expand")
    f.add_argument("--modules", nargs="*", help="module names or glob patterns (default: LoRA or all linear)")
    f.add_argument("--batch-size", type=int, default=8)
    f.add_argument("--max-length", type=int, default=256)
    f.add_argument("--limit", type=int, help="use only the first N examples")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    f.add_argument("--device", default="cpu")
    f.add_argument("--force", action="store_true", help="overwrite --out")
    f.set_defaults(func=cmd_factors)

    d = sub.add_parser("demo", help="run the end-to-end example on a model the project builds itself")
    d.add_argument("--out", default="out/demo", help="output folder")
    d.add_argument("--quick", action="store_true", help="smaller, faster configuration")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        print(f"curvsafe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
