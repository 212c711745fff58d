"""LLM shapes: curvature memory, peak memory and time per restore iteration / optimizer step, against the plan.

    python benchmarks/scale.py --out benchmarks/results [--shapes llama-3.2-1b,llama-3-8b,qwen2.5-7b]
                               [--layers 1] [--batch-size 2] [--seq-len 128] [--error-batches 64] [--device cpu]

Models are built from the real configs' shapes with random weights (no download), decoder layers truncated to
``--layers`` (CPU: 1; every matrix keeps its real size; ``--vocab`` may shrink the vocabulary), LoRA r=16 on q/v
(PEFT's default)
and on all seven projections. Each measurement runs in its own process (a clean peak): one LoRA training step
(AdamW), ``restore(iterations=1)`` per method on random task/safety batches of the same shape (the time includes
restore's start-up evaluation, about one step), and CurvSafe(AdamW) steps (mean over ``--steps`` after one untimed
first step, whose refresh decomposes every factor from scratch; a refresh every ``--curvsafe-refresh`` steps
included; the plan is asked for the same interval). ``curvsafe`` runs the default settings, whose large dense
factors get warm-started truncated bases (``CurvSafeSettings.subspace``); ``curvsafe-full-eigh`` a full ``eigh`` of
each at every refresh, with the projection error of the former against the latter on the same factors.
Peak memory, above the built model that has run a tiny batch (weights and code pages excluded; compared with the
plan's peak minus weights): the CUDA allocator's peak on a GPU; on CPU the resident set sampled every 2 ms, with
glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``) so that freed blocks leave the resident set.
Times are ratios to the training step measured in the same process.

The error of the memory bound: on the first shape (the 1B one) with all projections, the K-FAC preconditioned
safety gradient ``(F + lambda I)^{-1} g`` (lambda = 0.1 x the Rayleigh quotient of g, restore's convention) with
truncated factors against dense ones, over ``--error-batches`` batches, per rank (``--error-ranks``) and passes per
fit (``--error-passes``, ``LowRank.passes``). The default, 64 batches of 2 x 128 tokens, is more tokens than the
largest factor's dimension (8192), so the factors are full-rank as in a real fit; with fewer (8 batches: rank below
1536) the truncation looks about twice as accurate as it is.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

# keep benchmarks/ (which holds a kernels.py) off the path: transformers probes for a package called `kernels`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

SHAPES = {  # from the public config.json files
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                         vocab_size=128256, num_hidden_layers=16, head_dim=64, model_type="llama"),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       vocab_size=128256, num_hidden_layers=32, head_dim=128, model_type="llama"),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                       vocab_size=152064, num_hidden_layers=28, head_dim=128, model_type="qwen2"),
}
TARGETS = {"qv": ["q_proj", "v_proj"],
           "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
FULL_EIGH = "curvsafe-full-eigh"  # CurvSafe with a full eigh of every dense factor at each refresh (subspace=None)
KINDS = ("train", "lbfgs", "kfac", "ekfac", "cg", "sgd", "curvsafe", FULL_EIGH)


def build(shape: str, layers: int, targets: str, device: str, dtype: torch.dtype, vocab: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = dict(SHAPES[shape])
    kind = spec.pop("model_type")
    spec.update(num_hidden_layers=layers, max_position_embeddings=4096, pad_token_id=0, eos_token_id=2)
    if vocab:
        spec["vocab_size"] = vocab
    cls, cfg = (LlamaForCausalLM, LlamaConfig) if kind == "llama" else (Qwen2ForCausalLM, Qwen2Config)
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(cfg(**spec)).to(dtype)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS[targets], lora_dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.01)  # a fine-tuned adapter, not a fresh one (B = 0 has no curvature)
    return model


def batches(n: int, batch_size: int, seq_len: int, vocab: int, device: str, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
        labels = ids.clone()
        labels[:, : seq_len // 4] = -100
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "labels": labels.to(device)})
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(model, opt, batch) -> None:
    opt.zero_grad()
    model(**batch).loss.backward()
    opt.step()


def worker(args) -> dict:
    """One measurement in this process: a training step's time, then ``args.kind``'s peak memory and time."""
    from curvsafe.objectives import LossTerm, Objective
    from curvsafe.optim import CurvSafe
    from curvsafe.plan import PeakMemory, PlanSettings, estimate
    from curvsafe.restoration.api import restore

    dtype = getattr(torch, args.dtype)
    model = build(args.shape, args.layers, args.targets, args.device, dtype, args.vocab)
    vocab = model.config.vocab_size
    train = batches(3, args.batch_size, args.seq_len, vocab, args.device, seed=0)
    safety = batches(1, args.batch_size, args.seq_len, vocab, args.device, seed=1)
    task = batches(1, args.batch_size, args.seq_len, vocab, args.device, seed=2)
    full_eigh = {"subspace": None} if args.kind == FULL_EIGH else {}
    plan = estimate(model, PlanSettings(batch_size=args.batch_size, seq_len=args.seq_len,
                                        refresh_interval=args.curvsafe_refresh, **full_eigh))
    params = [p for p in model.parameters() if p.requires_grad]
    out = {"shape": args.shape, "targets": args.targets, "kind": args.kind, "layers": args.layers,
           "plan": plan.to_json()}
    warm = batches(1, 1, 8, vocab, args.device, seed=4)[0]  # touch the code paths first: their pages are not memory
    model(**warm).loss.backward()
    model.zero_grad(set_to_none=True)
    meter = PeakMemory(args.device)
    meter.start()  # the measured kind first (a clean peak above the built model), then the training step's time
    if args.kind.startswith("curvsafe"):
        opt = CurvSafe(torch.optim.AdamW(params, lr=1e-4), model, safety, refresh_every=args.curvsafe_refresh,
                       refresh_tol=None, **full_eigh)
        model.train()
        train_step(model, opt, train[-1])  # not timed: the first refresh decomposes every factor from scratch
        sync(args.device)
        t = time.perf_counter()
        for i in range(args.steps):
            train_step(model, opt, train[i % len(train)])
        sync(args.device)
        out["seconds"] = (time.perf_counter() - t) / args.steps
        own = opt.state_dict()["curvsafe"]
        held = [t for part in (own["projector"]["eigen"], own["projector"]["rests"], own["sides"])
                for t in _tensors(part)]
        out["curvature_bytes"] = (opt.constraint.projector.kfac.curvature_bytes()
                                  + sum(t.numel() * t.element_size() for t in held))
    elif args.kind != "train":
        sync(args.device)
        t = time.perf_counter()
        result = restore(model, Objective([LossTerm("harmful", safety, sign=-1.0)]),
                         Objective([LossTerm("task", task)]), method=args.kind, iterations=1, progress=False)
        sync(args.device)
        out["seconds"] = time.perf_counter() - t
        out["stopped"] = result.stopped.value
    if args.kind != "train":
        out["peak_bytes"] = meter.stop()
    if args.kind.startswith("curvsafe"):  # after the peak: the full decompositions it compares with are not CurvSafe's
        out["projection_error"] = projection_error(opt, model, train[0])
        del opt
    for p in params:
        p.grad = None
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    step_times = []
    for b in train:
        sync(args.device)
        t = time.perf_counter()
        train_step(model, opt, b)
        sync(args.device)
        step_times.append(time.perf_counter() - t)
    out["train_step_s"] = statistics.median(step_times[1:])
    if args.kind == "train":
        out["peak_bytes"] = meter.stop()
    else:
        out["ratio_to_train_step"] = out["seconds"] / out["train_step_s"]
    return out


def projection_error(opt, model, batch) -> Optional[float]:
    """How far CurvSafe's projection (its truncated bases) lies from the one with a full ``eigh`` of every dense
    factor, on the same factors: relative error of the projected gradient of ``batch`` over the protected weights
    (None when no dense factor is truncated: they are the same)."""
    import copy

    proj = opt.constraint.projector
    if proj.subspace is None:
        return None
    full = copy.copy(proj)
    full.subspace, full.eigen = None, {}
    full._decompose(opt.constraint.params)
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    grads = {n: p.grad.detach().float() for n, p in opt.constraint.params.items() if p.grad is not None}
    ours, exact = dict(grads), dict(grads)
    proj.project(ours)
    full.project(exact)
    model.zero_grad(set_to_none=True)
    num = sum(float((ours[n] - exact[n]).square().sum()) for n in grads) ** 0.5
    return num / max(sum(float(exact[n].square().sum()) for n in grads) ** 0.5, 1e-300)


def _tensors(tree) -> list:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


def truncation_error(args) -> dict:
    """Relative error of the K-FAC preconditioned safety gradient, truncated factors against dense ones."""
    from curvsafe.curvature import KFAC
    from curvsafe.curvature.lowrank import LowRank
    from curvsafe.curvature.vectors import dot

    model = build(args.shape, args.layers, "all", args.device, getattr(torch, args.dtype), args.vocab)
    data = batches(args.error_batches, args.batch_size, args.seq_len, model.config.vocab_size, args.device, seed=3)
    t = time.perf_counter()
    dense = KFAC(model, low_rank=None, progress=False).fit(data, gradient=True)
    for b in dense.blocks:
        dense.eigen(b.name)
    dense_s, g = time.perf_counter() - t, dense.gradient
    rows = []
    for rank, passes in [(r, p) for r in args.error_ranks for p in args.error_passes]:
        t = time.perf_counter()
        # as restore fits it: the factors are freed at their decomposition, so it holds them or the bases
        op = KFAC(model, low_rank=LowRank(rank=rank, passes=passes), progress=False, keep_factors=False).fit(data)
        held = op.curvature_bytes()
        for b in op.blocks:
            op.eigen(b.name)
        seconds, held = time.perf_counter() - t, max(held, op.curvature_bytes())
        for rel_damping in (0.1, 1.0):
            lam = rel_damping * float(dot(g, dense.mv(g))) / float(dot(g, g))
            x_dense, x_trunc = dense.inverse_mv(g, lam), op.inverse_mv(g, lam)
            num = sum(float((x_trunc[n] - x_dense[n]).square().sum()) for n in g) ** 0.5
            den = sum(float(x_dense[n].square().sum()) for n in g) ** 0.5
            cos = float(dot(x_trunc, x_dense)) / (float(dot(x_trunc, x_trunc)) ** 0.5 * den)
            rows.append({"rank": rank, "passes": passes, "relative_damping": rel_damping, "relative_error": num / den,
                         "cosine": cos, "curvature_bytes": held, "seconds": seconds})
    return {"shape": args.shape, "tokens": args.error_batches * args.batch_size * args.seq_len, "rows": rows,
            "dense": {"curvature_bytes": dense.curvature_bytes(), "seconds": dense_s}}


def run(cmd_args: list[str]) -> dict:
    # glibc returns freed large blocks to the system only below its mmap threshold, which it raises as the run
    # frees large blocks; a fixed threshold keeps the resident set close to the memory actually live
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, __file__, *cmd_args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gib(n) -> str:
    return f"{n / 2 ** 30:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--targets", default="qv,all")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--vocab", type=int, default=0, help="vocabulary size (0: the real one; on CPU a smaller one "
                   "keeps a 1-layer model's cost in its layer, as in the full-depth model)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=6, help="CurvSafe steps timed")
    p.add_argument("--curvsafe-refresh", type=int, default=3, help="CurvSafe refreshes every this many steps (the "
                   "plan's refresh interval is set to it): two refreshes in 6 steps, so the EMA holds its own copy")
    p.add_argument("--error-batches", type=int, default=64, help="0: skip the truncation error; the default gives "
                   "more tokens than the largest factor dimension (full-rank factors)")
    p.add_argument("--error-ranks", default="256,512,1024", help="truncation ranks compared with dense factors")
    p.add_argument("--error-passes", default="1", help="passes per truncated fit compared (LowRank.passes: 1, 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--tag", default="")
    p.add_argument("--worker", choices=[*KINDS, "error"], help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.error_ranks = [int(r) for r in args.error_ranks.split(",")]
    args.error_passes = [int(r) for r in args.error_passes.split(",")]
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.worker:
        args.kind = args.worker
        args.targets = args.targets.split(",")[0]
        print(json.dumps(truncation_error(args) if args.worker == "error" else worker(args)))
        return
    common = ["--layers", str(args.layers), "--vocab", str(args.vocab), "--batch-size", str(args.batch_size),
              "--seq-len", str(args.seq_len),
              "--steps", str(args.steps), "--curvsafe-refresh", str(args.curvsafe_refresh), "--device", args.device,
              "--dtype", args.dtype,
              "--error-batches", str(args.error_batches), "--error-ranks", ",".join(map(str, args.error_ranks)),
              "--error-passes", ",".join(map(str, args.error_passes))]
    rows = []
    for shape in args.shapes.split(","):
        for targets in args.targets.split(","):
            for kind in args.kinds.split(","):
                r = run(["--worker", kind, "--shape", shape, "--targets", targets, *common])
                r.update(shape=shape, targets=targets, kind=kind)
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "plan"}), flush=True)
                write(args, rows, None)  # after every row: a run cut short by a timeout keeps what it measured
    error = None
    if args.error_batches:
        error = run(["--worker", "error", "--shape", args.shapes.split(",")[0], *common])
        print(json.dumps(error), flush=True)
    write(args, rows, error)


def write(args, rows: list[dict], error) -> None:
    date = datetime.date.today().isoformat()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu-{torch.get_num_threads()}threads"
    stem = f"scale_{device.replace(' ', '_')}_{date}{args.tag}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "date": date, "torch": torch.__version__, "python": platform.python_version(),
            "layers": args.layers, "vocab": args.vocab or "real", "batch_size": args.batch_size,
            "seq_len": args.seq_len, "dtype": args.dtype,
            "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:])}
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows, "truncation_error": error}, indent=2))
    cpu = not args.device.startswith("cuda")
    lines = [f"# Scale: LLM shapes, {device}, {date}", "", f"`{meta['command']}`; torch {torch.__version__}; "
             f"{args.layers} decoder layer(s) of each shape (real matrix sizes; vocabulary "
             f"{args.vocab or 'real'}), batch "
             f"{args.batch_size} x {args.seq_len} tokens, {args.dtype}, LoRA r=16.", "",
             "Peak: above the built model (weights excluded), the plan's peak minus weights beside it; "
             + ("the resident set sampled every 2 ms." if cpu else "the CUDA allocator's peak."), "",
             "| shape | LoRA | what | peak GiB | plan GiB | plan/measured | curvature GiB (plan) | "
             "time / training step | plan steps |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['targets']} | {r['kind']} | failed: {r['error']} | | | | | |")
            continue
        plan = r["plan"]
        if r["kind"] == "train":
            planned = plan["training_step_bytes"]
            curv, steps, ratio = "-", 1.0, 1.0
        else:
            m = plan["methods"]["curvsafe" if r["kind"] == FULL_EIGH else r["kind"]]
            planned, curv, steps, ratio = m["peak_bytes"], gib(m["curvature_bytes"]), m["steps_per_iteration"], \
                r["ratio_to_train_step"]
        planned -= plan["weight_bytes"]
        measured = r["peak_bytes"]
        lines.append(f"| {r['shape']} | {r['targets']} | {r['kind']} | {gib(measured)} | {gib(planned)} | "
                     f"{planned / max(measured, 1):.2f} | {curv} | {ratio:.1f} | {steps:.1f} |")
    errors = [r for r in rows if r.get("projection_error") is not None]
    if errors:
        lines += ["", "CurvSafe's projection with its warm-started truncated bases (``CurvSafeSettings.subspace``) "
                  "against a full eigh of the same factors after the timed steps, relative error of a projected "
                  "training gradient: " + "; ".join(f"{r['shape']} {r['targets']} {r['projection_error']:.1e}"
                                                   for r in errors) + "."]
    if error:
        lines += ["", "## Truncated against dense factors (K-FAC preconditioned safety gradient)", ""]
        if "error" in error:
            lines.append(f"failed: {error['error']}")
        else:
            d = error["dense"]
            lines += [f"{error['shape']}, {args.layers} layer(s), all projections, {error['tokens']} tokens "
                      f"(random weights and tokens); damping relative to the gradient's Rayleigh quotient (restore's "
                      f"convention, default 0.1). Dense: {gib(d['curvature_bytes'])} GiB, fit + eigen "
                      f"{d['seconds']:.1f} s. Truncated curvature: the most held at once, as restore fits it (its "
                      f"factors until they are decomposed, then the bases).", "",
                      "| rank | passes | relative damping | relative error | cosine | curvature GiB | fit + eigen s |",
                      "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            lines += [f"| {r['rank']} | {r.get('passes', 1)} | {r['relative_damping']} | {r['relative_error']:.4f} | "
                      f"{r['cosine']:.5f} | {gib(r['curvature_bytes'])} | {r['seconds']:.1f} |" for r in error["rows"]]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    if error is not None:
        print(f"wrote {out / stem}.md")


if __name__ == "__main__":
    main()
