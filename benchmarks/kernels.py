"""Benchmark the four curvature ops per backend against the PyTorch reference, side by side in one run.

Every row is a median over repeats of the same call on the same inputs, measured in this process, with its ratio
to the reference (``speedup`` > 1 means faster than the reference) and, the headline, to the best plain-PyTorch
formulation measured beside it: the reference (fp32 upcast), the same maths at the input precision (a bf16/fp16
GEMM chain, fp32 accumulation inside the GEMM, as a user would write it), ``torch.compile`` of the reference
(``--compile``; for ``linear_fisher_diag``, whose reference loops over examples in Python, of the per-example
einsum), ``x.T @ x`` as kronfluence / kfac-pytorch / curvlinops write the covariance, and materialised
per-example gradients for ``linear_fisher_diag``. Writes ``kernels_<device>_<date>.md`` and ``.json`` into
``--out``.

    python benchmarks/kernels.py --out benchmarks/results            # CPU: torch vs C++
    python benchmarks/kernels.py --out DIR --device cuda              # GPU: torch vs Triton (+ bf16)

Memory: on CUDA the peak allocated bytes during the call (``torch.cuda.max_memory_allocated``); on CPU the bytes
the profiler saw allocated during the call (a sum of allocations, not a peak).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

# this file is benchmarks/kernels.py: keep its folder off the path so that nothing (transformers probes for a
# package called `kernels`) imports it by mistake
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # silence the profiler's per-call log lines

import torch  # noqa: E402
from curvsafe.kernels import covariance_update, kron_eigen_apply, linear_fisher_diag, linear_fisher_vp, reference  # noqa: E402

# Dense (no sparsity) peak TFLOP/s by GPU and input dtype (fp32 runs as TF32 in the Triton kernels).
DENSE_PEAK = {"H100": {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7},
              "H200": {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7}}


def timed(fn, device: str, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_bytes(fn, device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.cpu_memory_usage, 0) for e in prof.events() if e.cpu_memory_usage)


def gpu_peak(dtype: torch.dtype) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peaks in DENSE_PEAK.items():
        if key in name:
            return peaks[str(dtype).replace("torch.", "")]
    return None


NATIVE = "plain, input dtype"
COMPILED = "torch.compile"
PLAIN = ("reference", NATIVE, COMPILED, "x.T @ x (peers)", "per-example grads")  # the plain-PyTorch baselines


def cases(device: str, quick: bool, compile_reference: bool = False):
    """(op, shape dict, dtype, flops, {label: callable}) with the plain-PyTorch baselines first."""
    gen = torch.Generator().manual_seed(0)
    on_gpu = device == "cuda"
    backends = ["triton"] if on_gpu else ["cpp"]
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if on_gpu else [torch.float32]
    big = not quick

    def rand(*shape, dtype):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    def plain(runs: dict, dtype, native, compiled_fn, *args, **kw) -> dict:
        """``runs`` with the input-precision formulation (not for fp32, where it is the reference) and the compiled
        reference (with ``--compile``) after the reference."""
        out = {"reference": runs.pop("reference")}
        if dtype != torch.float32:
            out[NATIVE] = native
        if compile_reference:
            fn = torch.compile(compiled_fn, dynamic=False)
            out[COMPILED] = lambda: fn(*args, **kw)
        return {**out, **runs}

    for dtype in dtypes:
        # op 1: covariance_update
        T, d = (16384, 4096) if on_gpu and big else ((4096, 1024) if big else (1024, 256))
        x = rand(T, d, dtype=dtype)
        runs = {"reference": lambda: reference.covariance_update(x),
                "x.T @ x (peers)": lambda: x.T.float() @ x.float() if dtype != torch.float32 or not on_gpu
                else x.T @ x}
        runs = plain(runs, dtype, lambda: (x.T @ x).float(), reference.covariance_update, x)
        for b in backends:
            runs[b] = lambda b=b: covariance_update(x, backend=b)
        yield "covariance_update", {"T": T, "d": d}, dtype, T * d * d, runs

        # op 2: linear_fisher_vp
        T, di, do = (16384, 4096, 4096) if on_gpu and big else ((2048, 512, 512) if big else (512, 128, 128))
        x, gy, V = rand(T, di, dtype=dtype), rand(T, do, dtype=dtype), rand(do, di, dtype=dtype)
        seg = torch.arange(T, device=device) // 128
        runs = {"reference": lambda: reference.linear_fisher_vp(x, gy, V, segment_ids=seg)}

        def fisher_vp_native():
            c = reference.segment_sums(((gy @ V) * x).float().sum(dim=1), seg)
            return ((gy * c[:, None].to(gy.dtype)).T @ x).float()

        runs = plain(runs, dtype, fisher_vp_native, reference.linear_fisher_vp, x, gy, V, segment_ids=seg,
                     num_segments=T // 128)
        for b in backends:
            runs[b] = lambda b=b: linear_fisher_vp(x, gy, V, segment_ids=seg, backend=b)
        yield "linear_fisher_vp", {"T": T, "d_in": di, "d_out": do, "seq": 128}, dtype, 4 * T * di * do, runs

        # op 3: linear_fisher_diag (sequences of L tokens are the examples; long and short sequences)
        T, di, do = (16384, 1024, 1024) if on_gpu and big else ((2048, 256, 256) if big else (512, 64, 64))
        x, gy = rand(T, di, dtype=dtype), rand(T, do, dtype=dtype)
        for L in (64, 8):
            seg = torch.arange(T, device=device) // L

            def materialised(L=L):
                per_example = torch.einsum("nlo,nli->noi", gy.float().view(-1, L, do), x.float().view(-1, L, di))
                return per_example.square().sum(0)

            def native(L=L):
                per_example = torch.bmm(gy.view(-1, L, do).transpose(1, 2), x.view(-1, L, di))
                return per_example.float().square().sum(0)

            runs = {"reference": lambda seg=seg: reference.linear_fisher_diag(x, gy, segment_ids=seg),
                    "per-example grads": materialised}
            runs = plain(runs, dtype, native, materialised)  # the reference loops in Python: compile the einsum
            for b in backends:
                runs[b] = lambda b=b, seg=seg: linear_fisher_diag(x, gy, segment_ids=seg, backend=b)
            yield "linear_fisher_diag", {"T": T, "d_in": di, "d_out": do, "seq": L}, dtype, 2 * T * di * do, runs

        # op 4: kron_eigen_apply
        di, do = (4096, 4096) if on_gpu and big else ((1024, 1024) if big else (256, 256))
        V = rand(do, di, dtype=dtype)
        QA = torch.linalg.qr(torch.randn(di, di, generator=gen))[0].to(device=device, dtype=dtype)
        QG = torch.linalg.qr(torch.randn(do, do, generator=gen))[0].to(device=device, dtype=dtype)
        scale = torch.rand(do, di, generator=gen).to(device)
        runs = {"reference": lambda: reference.kron_eigen_apply(V, QA, QG, scale)}
        runs = plain(runs, dtype, lambda: (QG @ ((QG.mT @ V @ QA) * scale.to(dtype)) @ QA.mT).float(),
                     reference.kron_eigen_apply, V, QA, QG, scale)
        for b in backends:
            runs[b] = lambda b=b: kron_eigen_apply(V, QA, QG, scale, backend=b)
        yield "kron_eigen_apply", {"d_in": di, "d_out": do}, dtype, 4 * (do * do * di + do * di * di), runs


def run(device: str, repeats: int, quick: bool, on_row=lambda rows: None, compile_reference: bool = False
        ) -> list[dict]:
    """Every case per backend; ``on_row(rows)`` after each row (partial results survive a time limit)."""
    rows = []
    for op, shape, dtype, flops, runs in cases(device, quick, compile_reference):
        ref_time, best_plain = None, float("inf")
        for label, fn in runs.items():
            sec = timed(fn, device, repeats)
            ref_time = sec if label == "reference" else ref_time
            best_plain = min(best_plain, sec) if label in PLAIN else best_plain
            peak = gpu_peak(dtype)
            tflops = flops / sec / 1e12
            rows.append({"op": op, "shape": shape, "dtype": str(dtype).replace("torch.", ""), "backend": label,
                         "seconds": sec, "speedup_vs_reference": ref_time / sec,
                         "speedup_vs_best_plain": None if label in PLAIN else best_plain / sec, "tflops": tflops,
                         "pct_dense_peak": 100 * tflops / peak if peak else None,
                         "memory_mb": memory_bytes(fn, device) / 2**20})
            print(f"{op:20s} {str(shape):45s} {rows[-1]['dtype']:9s} {label:18s} {sec * 1e3:9.2f} ms "
                  f"x{rows[-1]['speedup_vs_reference']:5.2f} {rows[-1]['memory_mb']:9.1f} MB", flush=True)
            on_row(rows)
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| op | shape | dtype | backend | ms | **speedup vs best plain PyTorch** | speedup vs "
             "reference | TFLOP/s | % dense peak | MB |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        pct = f"{r['pct_dense_peak']:.1f}" if r["pct_dense_peak"] is not None else "-"
        best = r.get("speedup_vs_best_plain")
        shape = ", ".join(f"{k}={v}" for k, v in r["shape"].items())
        lines.append(f"| {r['op']} | {shape} | {r['dtype']} | {r['backend']} | {r['seconds'] * 1e3:.2f} | "
                     f"{'-' if best is None else f'**{best:.2f}**'} | {r['speedup_vs_reference']:.2f} | "
                     f"{r['tflops']:.3f} | {pct} | {r['memory_mb']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the reference")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    header = (f"# Kernel benchmark: {name}\n\ntorch {torch.__version__}, median of {args.repeats} repeats, "
              f"{time.strftime('%Y-%m-%d')}. Speedup = the baseline's time / this time, same run; best plain "
              "PyTorch = the fastest of the plain-PyTorch rows of the case (module docstring).")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device_tag = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-") if args.device == "cuda" else \
        f"cpu-{torch.get_num_threads()}threads"
    stem = f"kernels_{device_tag}_{time.strftime('%Y-%m-%d')}" + ("_quick" if args.quick else "")

    def write(rows: list[dict]) -> None:
        (out / f"{stem}.md").write_text(markdown(rows, header))
        (out / f"{stem}.json").write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows},
                                                     indent=2))

    write(run(args.device, args.repeats, args.quick, on_row=write, compile_reference=args.compile))
    print(f"wrote {out / stem}.md")


if __name__ == "__main__":
    main()
