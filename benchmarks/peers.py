"""curvsafe against the libraries users would pick instead: kronfluence (EK-FAC influence) and curvlinops (curvature
operators), on the same model, data and precision.

    python benchmarks/peers.py --out benchmarks/results [--cases kfac-linear,kfac-lora,ekfac-lora] [--repeats 5]
                               [--hidden 512 --intermediate 1376 --layers 4 --vocab 4000]
                               [--batches 4 --batch-size 8 --seq-len 128] [--device cpu]

Model: a random-init Llama (float32, eval mode), fitted on ``--batches`` random batches of ``--batch-size`` x
``--seq-len`` tokens, every token a counted label (no padding: the libraries' padding conventions differ). Cases:

- ``kfac-linear``: K-FAC factors of every decoder linear layer (q, k, v, o, gate, up, down);
- ``kfac-lora``: the same with PEFT LoRA r=16 on those seven projections, factors of the LoRA matrices;
- ``ekfac-lora``: EK-FAC (factors, eigendecompositions, corrected eigenvalues) of the LoRA matrices. curvlinops'
  EK-FAC takes one loss term per datum (a last-token loss here), so it is not in this case. Besides curvsafe's
  default (float32 eigendecompositions, see :class:`curvsafe.curvature.EKFAC`), ``curvsafe-float64`` decomposes
  in float64 as kronfluence does; the table gives kronfluence's agreement with both, and the note under it how far
  the two bases' damped inverses lie apart;
- ``influence-lora``: pairwise influence scores of ``--batch-size`` query examples (one more random batch) against
  every training example, through the EK-FAC of ``ekfac-lora`` (with kronfluence's float64 basis) fitted
  beforehand (not timed): curvsafe
  :func:`curvsafe.influence.pairwise_scores` against kronfluence's ``compute_pairwise_scores``, at the same
  damping (0.1 x curvsafe's mean corrected eigenvalue; kronfluence's EK-FAC is the curvature of the summed loss per
  example where curvsafe's is of the mean per-token loss, so its ``damping_factor`` is that times tokens per
  example, and its scores are curvsafe's divided by tokens per example).

Each library's call is what a user writes: curvsafe ``KFAC(model, names).fit(batches)`` / ``EKFAC(...).fit``;
curvlinops ``KFACLinearOperator(..., fisher_type="empirical").compute_kronecker_factors()``; kronfluence
``prepare_model`` once, then ``Analyzer(...).fit_covariance_matrices`` / ``fit_all_factors`` with
``FactorArguments(strategy=..., use_empirical_fisher=True)``, float32 covariances, its default float64
eigendecomposition, factors written to a temporary folder (its design). Time: all libraries and the plain forward +
backward of the same batches (sum of the token losses, gradients of the curved weights only) interleaved per
repeat, median and range over ``--repeats``; "curvature work" is a library's time minus that forward + backward,
the part the libraries do differently. For the K-FAC cases a line under the table times curvsafe's covariance
products alone, on the same rows captured once (interleaved with the repeats): the floor of its curvature work at
that precision on the device, and that floor as a share of each peer's work. Peak memory: each library once in its own
process (glibc's mmap threshold fixed), the resident set above the built model sampled every 2 ms (the CUDA
allocator's peak on a GPU).
Agreement: curvsafe's factors against each peer's after the best scale ``c`` (the peers sum where curvsafe
averages: the reported ``c`` is that convention), max relative error over the curved modules.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# keep benchmarks/ (which holds a kernels.py) off the path: transformers probes for a package called `kernels`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the curvlinops wrapper of test_kfac

import torch  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CASES = {"kfac-linear": ("linear", "kfac"), "kfac-lora": ("lora", "kfac"), "ekfac-lora": ("lora", "ekfac"),
         "influence-lora": ("lora", "influence")}
FLOAT64 = "curvsafe-float64"  # curvsafe's EK-FAC with kronfluence's float64 eigendecompositions (eigen_dtype)
LIBRARIES = {"kfac": ("curvsafe", "curvlinops", "kronfluence"), "ekfac": ("curvsafe", FLOAT64, "kronfluence"),
             "influence": ("curvsafe", "kronfluence")}
BASELINE = "forward+backward"


def build(args, variant: str):
    """(model, names of the curved linear modules) on ``args.device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=max(256, args.seq_len), attn_implementation="eager")
    model = LlamaForCausalLM(cfg).to(args.device).eval()
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=list(PROJECTIONS),
                                                 lora_dropout=0.0))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # non-zero B, as after fine-tuning (with B = 0 the A factors' G would be 0)
                torch.nn.init.normal_(p, std=0.02)
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".lora_" in n]
    else:
        names = [n for n, m in model.named_modules() if n.split(".")[-1] in PROJECTIONS]
    model.eval()
    return model, names


def make_batches(args, count: int = 0, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count or args.batches):
        ids = torch.randint(3, args.vocab, (args.batch_size, args.seq_len), generator=g).to(args.device)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def sum_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                             reduction="sum")


def curved_weights(model, names: list[str]) -> list[torch.nn.Parameter]:
    return [model.get_submodule(n).weight for n in names]


def _kronfluence_task(names: list[str]):
    from kronfluence.task import Task

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return sum_loss(model, batch)

        def compute_measurement(self, batch, model):
            return sum_loss(model, batch)

        def get_influence_tracked_modules(self):
            return names

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return LMTask()


class _Rows(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(b["input_ids"].shape[0])]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class Runner:
    """One library's fit on one case: :meth:`run` returns ``{module: {"A": ..., "G": ..., "lambda": ...}}``."""

    def __init__(self, library: str, kind: str, model, names: list[str], batches: list[dict], args):
        self.library, self.kind, self.names, self.batches, self.args = library, kind, names, batches, args
        self.model = copy.deepcopy(model) if library != "curvsafe" else model
        if kind == "influence" and library != BASELINE:  # queries, and the EK-FAC fitted beforehand (not timed)
            from curvsafe.curvature import EKFAC

            self.queries = make_batches(args, count=1, seed=2)
            # kronfluence's float64 basis, so that the agreement checks the scores, not the two bases
            self.ekfac = EKFAC(model, names, progress=False, low_rank=None, eigen_dtype=torch.float64).fit(batches)
            self.damping = 0.1 * float(torch.stack([c.mean() for c in self.ekfac.corrected.values()]).mean())
            # kronfluence's EK-FAC eigenvalues average over examples what curvsafe's average over tokens
            self.rescale = sum(int(b["attention_mask"].sum()) for b in batches) / sum(len(b["input_ids"])
                                                                                      for b in batches)
        if library == "kronfluence":
            from kronfluence.analyzer import prepare_model

            logging.getLogger("kronfluence").setLevel(logging.WARNING)
            self.task = _kronfluence_task(names)
            self.model = prepare_model(self.model, self.task)
            self.dataset = _Rows(batches)
            if kind == "influence":
                self.folder = tempfile.TemporaryDirectory(prefix="peers-kronfluence-")
                self.analyzer = self._analyzer(self.folder.name)
                self.analyzer.fit_all_factors("f", self.dataset, per_device_batch_size=args.batch_size,
                                              factor_args=self._factor_args("ekfac"), overwrite_output_dir=True)
        if library == BASELINE:
            for p in self.model.parameters():
                p.requires_grad_(False)
            for p in curved_weights(self.model, names):
                p.requires_grad_(True)

    def run(self) -> dict:
        return getattr(self, "_" + self.library.replace("+", "_").replace("-", "_"))()

    def _forward_backward(self) -> dict:
        for b in self.batches:
            self.model.zero_grad(set_to_none=True)
            sum_loss(self.model, b).backward()
        return {}

    def _curvsafe(self) -> dict:
        from curvsafe.curvature import EKFAC, KFAC

        if self.kind == "influence":
            from curvsafe.influence import pairwise_scores

            return {"all": {"scores": pairwise_scores(self.ekfac, self.queries, self.batches, damping=self.damping)}}
        cls = EKFAC if self.kind == "ekfac" else KFAC
        dtype = torch.float64 if self.library == FLOAT64 else None
        op = self.op = cls(self.model, self.names, progress=False, low_rank=None, eigen_dtype=dtype).fit(self.batches)
        out = {n: {"A": f.A, "G": f.G} for n, f in op.factors.items()}
        if self.kind == "ekfac":
            for n in out:
                out[n]["lambda"] = op.corrected[n]
        return out

    _curvsafe_float64 = _curvsafe

    def _curvlinops(self) -> dict:
        from curvlinops import KFACLinearOperator
        from test_kfac import CurvlinopsLM  # the tests' wrapper: (batch, classes, positions) logits

        wrapped = CurvlinopsLM(self.model)
        data = [(b["input_ids"], b["labels"][:, 1:]) for b in self.batches]
        op = KFACLinearOperator(wrapped, torch.nn.CrossEntropyLoss(reduction="sum"),
                                curved_weights(self.model, self.names), data, fisher_type="empirical",
                                kfac_approx="expand", check_deterministic=False,
                                num_data=sum(b["input_ids"].shape[0] for b in self.batches))
        op.compute_kronecker_factors()
        return {n: {"A": op._input_covariances[f"m.{n}"], "G": op._gradient_covariances[f"m.{n}"]}
                for n in self.names}

    def _analyzer(self, folder: str):
        from kronfluence.analyzer import Analyzer

        return Analyzer("peers", self.model, self.task, cpu=self.args.device == "cpu", disable_tqdm=True,
                        output_dir=folder, log_level=logging.WARNING)

    @staticmethod
    def _factor_args(strategy: str):
        from kronfluence.arguments import FactorArguments

        return FactorArguments(strategy=strategy, use_empirical_fisher=True, activation_covariance_dtype=torch.float32,
                               gradient_covariance_dtype=torch.float32)

    def _kronfluence(self) -> dict:
        if self.kind == "influence":
            from kronfluence.arguments import ScoreArguments

            self.analyzer.compute_pairwise_scores(
                "s", "f", _Rows(self.queries), self.dataset, per_device_query_batch_size=self.args.batch_size,
                per_device_train_batch_size=self.args.batch_size, overwrite_output_dir=True,
                score_args=ScoreArguments(damping_factor=self.damping * self.rescale))
            return {"all": {"scores": self.analyzer.load_pairwise_scores("s")["all_modules"]}}
        with tempfile.TemporaryDirectory(prefix="peers-kronfluence-") as out:
            analyzer = self._analyzer(out)
            fit = analyzer.fit_all_factors if self.kind == "ekfac" else analyzer.fit_covariance_matrices
            fit("f", self.dataset, per_device_batch_size=self.args.batch_size, factor_args=self._factor_args(self.kind),
                overwrite_output_dir=True)
            cov = analyzer.load_covariance_matrices("f")
            lam = analyzer.load_lambda_matrices("f") if self.kind == "ekfac" else None
        out = {n: {"A": cov["activation_covariance"][n], "G": cov["gradient_covariance"][n]} for n in self.names}
        if lam is not None:
            for n in self.names:
                out[n]["lambda"] = lam["lambda_matrix"][n]
        return out


def agreement(ours: dict, theirs: dict) -> dict:
    """Per factor kind: the median best scale ``c`` (ours ~ c * theirs) and the max relative error after it."""
    out = {}
    for kind in ("A", "G", "lambda", "scores"):
        pairs = [(ours[n][kind], theirs[n].get(kind)) for n in ours if ours[n].get(kind) is not None
                 and theirs.get(n, {}).get(kind) is not None]
        if not pairs:
            continue
        scales, errors = [], []
        for a, b in pairs:
            a, b = a.double().cpu(), b.double().cpu().reshape(a.shape)
            c = float((a * b).sum() / (b * b).sum().clamp_min(1e-300))
            scales.append(c)
            errors.append(float((a - c * b).norm() / a.norm().clamp_min(1e-300)))
        out[kind] = {"scale": statistics.median(scales), "max_rel_err": max(errors)}
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def captured_rows(model, names: list[str], batches: list[dict]) -> list[list[torch.Tensor]]:
    """The rows whose covariances curvsafe's K-FAC sums for ``names``, batch by batch, from its own capture pass:
    each distinct block input (an input several blocks share, as q/k/v's, once) and each output gradient, copies
    (captured once, not timed)."""
    from curvsafe.curvature import KFAC
    from curvsafe.curvature._pass import BatchInfo, capture_pass

    op = KFAC(model, names, progress=False, low_rank=None)
    rows: list[list[torch.Tensor]] = [[]]
    seen: set[int] = set()  # the capture hands blocks that share an input the same object within a forward

    def on_forward(block, a):
        if id(a) not in seen:
            seen.add(id(a))
            rows[-1].append(a.clone())

    def on_batch_end():
        seen.clear()
        rows.append([])

    capture_pass(model, op.blocks, batches, loss=op.loss, fisher_type="empirical", generator=None,
                 on_forward=on_forward, on_backward=lambda block, g: rows[-1].append(g.clone()), info=BatchInfo(),
                 on_batch_end=on_batch_end, progress=False)
    return rows[:-1]


def covariance_products(rows: list[list[torch.Tensor]]) -> None:
    """curvsafe's factor sums alone: ``covariance_update`` of each captured row block into its running sum."""
    from curvsafe.kernels import covariance_update

    sums: dict[tuple, torch.Tensor] = {}
    for batch in rows:
        for j, x in enumerate(batch):
            key = (j, x.shape[1])
            if key in sums:
                covariance_update(x, sums[key], alpha=1.0, beta=1.0, lower_only=True)
            else:
                sums[key] = covariance_update(x, lower_only=True)


def timing(args, case: str) -> dict:
    variant, kind = CASES[case]
    model, names = build(args, variant)
    batches = make_batches(args)
    runners = {lib: Runner(lib, kind, model, names, batches, args) for lib in (BASELINE, *LIBRARIES[kind])}
    for r in runners.values():  # warm-up (allocator, kernels, first-call checks)
        r.run()
    rows = captured_rows(model, names, batches) if kind == "kfac" else []
    if rows:
        covariance_products(rows)  # warm-up
    times = {lib: [] for lib in runners}
    floor: list[float] = []
    results = {}
    for _ in range(args.repeats):
        for lib, r in runners.items():
            sync(args.device)
            t = time.perf_counter()
            results[lib] = r.run()
            sync(args.device)
            times[lib].append(time.perf_counter() - t)
        if rows:
            sync(args.device)
            t = time.perf_counter()
            covariance_products(rows)
            sync(args.device)
            floor.append(time.perf_counter() - t)
    agree = {lib: agreement(results["curvsafe"], results[lib]) for lib in LIBRARIES[kind] if lib != "curvsafe"}
    row = {"case": case, "modules": len(names), "seconds": times, "agreement": agree}
    if floor:
        row["covariance_seconds"] = floor
    if FLOAT64 in runners:
        row["agreement_float64"] = agreement(results[FLOAT64], results["kronfluence"])
        row["basis_inverse_rel_diff"] = basis_effect(runners["curvsafe"].op, runners[FLOAT64].op, model, names,
                                                     batches)
    return row


def basis_effect(ours, exact, model, names: list[str], batches: list[dict]) -> dict:
    """How far the float32-basis EK-FAC's damped inverse lies from the float64 basis's, applied to the loss
    gradient, at damping 0.1x and 0.01x the mean corrected eigenvalue: ``{damping factor: relative difference}``."""
    model.zero_grad(set_to_none=True)
    for b in batches:
        sum_loss(model, b).backward()
    grad = {f"{n}.weight": model.get_submodule(n).weight.grad.clone() for n in names}
    mean = float(torch.stack([c.mean() for c in exact.corrected.values()]).mean())
    out = {}
    for factor in (0.1, 0.01):
        x, y = ours.inverse_mv(grad, factor * mean), exact.inverse_mv(grad, factor * mean)
        diff = sum(float((x[n] - y[n]).double().square().sum()) for n in x)
        out[str(factor)] = (diff / sum(float(y[n].double().square().sum()) for n in y)) ** 0.5
    return out


def peak(args, case: str, library: str) -> int:
    from curvsafe.plan import PeakMemory

    variant, kind = CASES[case]
    model, names = build(args, variant)
    batches = make_batches(args)
    runner = Runner(library, kind, model, names, batches, args)
    meter = PeakMemory(args.device)
    meter.start()
    runner.run()
    return meter.stop()


def measure_peaks(args, case: str) -> dict:
    """Each library in a fresh process (glibc's mmap threshold fixed so that freed blocks leave the resident set)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = {}
    for lib in (BASELINE, *LIBRARIES[CASES[case][1]]):
        cmd = [sys.executable, __file__, "--peak-of", f"{case}:{lib}", *sys.argv[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"peak run {case}:{lib} failed:\n{done.stderr[-3000:]}")
        out[lib] = int(done.stdout.strip().splitlines()[-1])
    return out


def table(rows: list[dict], peaks: dict) -> list[str]:
    lines = ["| case | library | time (median, range) | ÷ curvsafe | curvature work (time - forward+backward) | "
             "÷ curvsafe's | peak memory above the model | agreement with curvsafe (scale c, max rel. err.) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        med = {lib: statistics.median(t) for lib, t in row["seconds"].items()}
        base = med[BASELINE]
        for lib, t in row["seconds"].items():
            work = med[lib] - base
            ratio = "-" if lib == BASELINE else f"{med[lib] / med['curvsafe']:.2f}x"
            work_ratio = "-" if lib in (BASELINE, "curvsafe") else f"{work / (med['curvsafe'] - base):.2f}x"
            agree = _agreement_cell(row["agreement"].get(lib, {}))
            if lib == "kronfluence" and "agreement_float64" in row:
                agree += f" (with {FLOAT64}: {_agreement_cell(row['agreement_float64'])})"
            mem = peaks.get(row["case"], {}).get(lib)
            lines.append(f"| {row['case']} ({row['modules']} modules) | {lib} | {med[lib]:.2f} s "
                         f"({min(t):.2f}-{max(t):.2f}) | {ratio} | {'-' if lib == BASELINE else f'{work:.2f} s'} | "
                         f"{work_ratio} | {'-' if mem is None else f'{mem / 2**20:.0f} MiB'} | {agree} |")
    for row in rows:
        if "covariance_seconds" in row:
            med = {lib: statistics.median(t) for lib, t in row["seconds"].items()}
            work = {lib: med[lib] - med[BASELINE] for lib in med}
            cov = row["covariance_seconds"]
            peers = ", ".join(f"{statistics.median(cov) / work[lib]:.2f}x {lib}'s" for lib in work
                              if lib not in (BASELINE, "curvsafe"))
            lines += ["", f"{row['case']}: curvsafe's covariance products alone (`covariance_update` of every "
                      f"distinct input and output gradient of every batch, captured once): {statistics.median(cov):.2f}"
                      f" s ({min(cov):.2f}-{max(cov):.2f}), {peers} curvature work; curvsafe's whole curvature work "
                      f"is {work['curvsafe']:.2f} s."]
    for row in rows:
        if "basis_inverse_rel_diff" in row:
            lines += ["", f"{row['case']}: curvsafe's float32 eigenbasis against {FLOAT64}'s, the damped inverse "
                      "applied to the loss gradient differs by " + ", ".join(
                          f"{v:.1e} at damping {k}x the mean corrected eigenvalue"
                          for k, v in row["basis_inverse_rel_diff"].items()) + "."]
    return lines


def _agreement_cell(kinds: dict) -> str:
    return "; ".join(f"{k} c={v['scale']:.4g}, {v['max_rel_err']:.1e}" for k, v in kinds.items()) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-peaks", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)  # CASE:LIBRARY, the child process of a peak run
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; the cases are {list(CASES)}")
    if args.peak_of:
        case, lib = args.peak_of.split(":")
        print(peak(args, case, lib))
        return
    rows = []
    for case in cases:
        rows.append(timing(args, case))
        print(json.dumps(rows[-1]), flush=True)
    peaks = {} if args.no_peaks else {case: measure_peaks(args, case) for case in cases}
    from importlib.metadata import version

    cuda = args.device.startswith("cuda")
    device = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    date = time.strftime("%Y-%m-%d")
    lines = [f"# curvsafe vs kronfluence {version('kronfluence')} vs curvlinops "
             f"{version('curvlinops-for-pytorch')} ({device}, {date}, torch {torch.__version__}, {platform.machine()})",
             "",
             f"Random-init Llama: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
             f"vocabulary {args.vocab}, float32; {args.batches} batches of {args.batch_size} x {args.seq_len} "
             f"tokens; {args.repeats} repeats interleaved (`python benchmarks/peers.py {' '.join(sys.argv[1:])}`). "
             "What each call is, and the conventions behind the scale c: the module docstring.", "",
             *table(rows, peaks)]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if args.device.startswith("cuda") else f"cpu-{torch.get_num_threads()}threads"
    (out / f"peers_{tag}_{date}.md").write_text(text)
    (out / f"peers_{tag}_{date}.json").write_text(json.dumps({"rows": rows, "peaks": peaks, "args": vars(args)},
                                                             indent=2))


if __name__ == "__main__":
    main()
