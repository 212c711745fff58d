"""Host memory and time per rank of loading a model for ``restore --fsdp2``: whole then sharded, against shard by
shard (:func:`curvsafe.models.load_sharded_model`).

    python benchmarks/sharded_load.py --out benchmarks/results [--ranks 2] [--layers 8] [--hidden 1024]
                                      [--intermediate 2816] [--vocab 32000] [--repeats 3]

A random-weight Llama of the given shape (LoRA r=16 on all seven projections) is saved as safetensors split in
500 MB files, as HF saves large models, in ``--checkpoint-dtype`` (bf16 by default, as released checkpoints are),
and loaded in float32 (restore's default ``--dtype``). Then, in fresh processes of ``--ranks`` gloo ranks (one thread
each), once per mode and repeat, interleaved:

- ``whole``: ``load_model`` on the CPU (every rank reads the whole model), then ``shard_model`` (what
  ``restore --fsdp2`` did before);
- ``sharded``: ``load_sharded_model`` (each rank reads only its rows).

Per rank, above the process's memory after its imports (sampled every 2 ms, glibc's mmap threshold fixed): peak
anonymous memory (the tensors: what each rank of a node needs of its own), peak file-backed memory (the
checkpoint's mapped pages: page cache, shared by a node's ranks and reclaimable), anonymous memory held after
the load; and the load time; max over ranks, median over repeats. The loaded
models are checked equal (parameters gathered whole, every rank).
"""

from __future__ import annotations

import argparse
import json
import platform
import os
import threading
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

# keep benchmarks/ (which holds a kernels.py) off the path: transformers probes for a package called `kernels`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

MODES = ("whole", "sharded")


def _rss_mib() -> tuple[float, float]:
    """(anonymous, file-backed) resident memory of this process, MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["RssAnon"].split()[0]) / 1024, int(fields["RssFile"].split()[0]) / 1024


class _Peaks:
    """Peak anonymous and file-backed resident memory above their levels at creation, sampled every 2 ms."""

    def __init__(self):
        self.base = _rss_mib()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = tuple(map(max, self.peak, _rss_mib()))

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._thread.join()
        return tuple(p - b for p, b in zip(map(max, self.peak, _rss_mib()), self.base))


def _rank(rank: int, port: int, ranks: int, mode: str, folder: str, out: str) -> None:
    import torch.distributed as dist

    from curvsafe.curvature.sharded import shard_model, whole_values
    from curvsafe.models import load_model, load_sharded_model
    from curvsafe.ranks import leave_group

    import peft  # noqa: F401  (imported before the measurement, as the modelling code below)
    from transformers import LlamaForCausalLM  # noqa: F401


    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks)
    peaks = _Peaks()
    t0 = time.perf_counter()
    if mode == "whole":
        model = shard_model(load_model(f"{folder}/model", f"{folder}/adapter", trainable_adapter=True,
                                       with_tokenizer=False)[0])
    else:
        model = load_sharded_model(f"{folder}/model", f"{folder}/adapter", trainable_adapter=True,
                                   with_tokenizer=False)[0]
    seconds = time.perf_counter() - t0
    (peak_anon, peak_file), held = peaks.stop(), _rss_mib()[0] - peaks.base[0]
    # a fingerprint of the loaded weights, gathered whole (after the measurement: the gather allocates)
    names = sorted(n for n, _ in model.named_parameters())[:: max(1, len(list(model.parameters())) // 12)]
    params = dict(model.named_parameters())
    sums = {n: float(v.double().sum()) for n, v in whole_values({n: params[n] for n in names}).items()}
    Path(out, f"{mode}-rank{rank}.json").write_text(json.dumps(
        {"peak_anon_mib": peak_anon, "peak_file_mib": peak_file, "held_mib": held, "seconds": seconds,
         "sums": sums}))
    model = params = None
    leave_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(mode: str, ranks: int, folder: Path) -> list[dict]:
    """One load in ``ranks`` fresh processes; each rank's figures."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(_free_port(), ranks, mode, str(folder), out), nprocs=ranks, join=True)
        return [json.loads(Path(out, f"{mode}-rank{r}.json").read_text()) for r in range(ranks)]


def build(folder: Path, args) -> int:
    """The random-weight model and its adapter, saved; the parameter count."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=512)
    model = LlamaForCausalLM(config)
    count = sum(p.numel() for p in model.parameters())
    model.to(getattr(torch, args.checkpoint_dtype)).save_pretrained(folder / "model", max_shard_size="500MB")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter = get_peft_model(model.float(), LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    adapter.save_pretrained(folder / "adapter")
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpoint-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="the dtype the checkpoint is saved in (it is loaded in float32, restore's default)")
    args = ap.parse_args()

    # glibc returns freed large blocks to the system only below its mmap threshold: fixed, the resident set stays
    # close to the memory actually live (the ranks are spawned with this environment)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    with tempfile.TemporaryDirectory(prefix="curvsafe-load-") as tmp:
        folder = Path(tmp)
        count = build(folder, args)
        runs: dict[str, list[list[dict]]] = {m: [] for m in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                runs[mode].append(measure(mode, args.ranks, folder))
                print(mode, json.dumps([{k: v for k, v in r.items() if k != "sums"} for r in runs[mode][-1]]),
                      flush=True)
    fingerprints = {m: [[r["sums"] for r in run] for run in runs[m]] for m in MODES}
    equal = all(f == fingerprints["whole"][0][0] for m in MODES for run in fingerprints[m] for f in run)
    rows = {}
    for mode in MODES:
        rows[mode] = {key: statistics.median(max(r[key] for r in run) for run in runs[mode])
                      for key in ("peak_anon_mib", "peak_file_mib", "held_mib", "seconds")}
    weights_mib = count * 4 / 2**20
    result = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                    for k, v in vars(args).items()},
              "parameters": count, "weights_mib": weights_mib, "rows": rows, "equal": equal,
              "runs": {m: [[{k: v for k, v in r.items() if k != "sums"} for r in run] for run in runs[m]]
                       for m in MODES}}
    lines = [f"# Loading a model for `restore --fsdp2` ({result['date']}, CPU, {args.ranks} gloo ranks, 1 thread each)",
             "", f"Command: `python benchmarks/sharded_load.py --out {args.out} --ranks {args.ranks} --layers "
             f"{args.layers} --hidden {args.hidden} --intermediate {args.intermediate} --vocab {args.vocab} "
             f"--repeats {args.repeats} --checkpoint-dtype {args.checkpoint_dtype}`. Random-weight Llama, "
             f"{count / 1e6:.0f}M parameters saved in {args.checkpoint_dtype}, loaded in float32 "
             f"({weights_mib:.0f} MiB), LoRA r=16 on all projections; safetensors in 500 MB files. Per rank, above "
             "the process's memory after its imports (max over ranks, median over repeats): peak resident memory "
             "of anonymous memory (the tensors: what each rank of a node needs of its own) and of file-backed "
             "memory (the checkpoint's mapped pages: page cache, shared by the ranks of a node and reclaimable), "
             "anonymous memory held after the load, load time. Loaded weights equal in both modes on every rank: "
             f"**{equal}**.", "",
             "| mode | peak anonymous per rank | peak file-backed | held after the load | load time |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for mode in MODES:
        r = rows[mode]
        lines.append(f"| {mode} | {r['peak_anon_mib']:.0f} MiB ({r['peak_anon_mib'] / weights_mib:.2f}x the "
                     f"weights) | {r['peak_file_mib']:.0f} MiB | {r['held_mib']:.0f} MiB | {r['seconds']:.2f} s |")
    w, s = rows["whole"], rows["sharded"]
    lines += ["", f"Sharded / whole: peak anonymous {s['peak_anon_mib'] / w['peak_anon_mib']:.2f}x, held "
              f"{s['held_mib'] / w['held_mib']:.2f}x, time {s['seconds'] / w['seconds']:.2f}x."]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"sharded_load_cpu_{result['date']}_{args.checkpoint_dtype}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
