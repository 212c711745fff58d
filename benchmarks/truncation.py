"""The memory bound's error on a trained model's spectra against random weights of the same architecture.

    python benchmarks/truncation.py --out benchmarks/results [--cache DIR] [--seed 0] [--fractions 8,4,2]

``benchmarks/scale.py`` measures the truncated K-FAC (:mod:`curvsafe.curvature.lowrank`) against the dense one on
LLM shapes with random weights and random tokens, the flattest spectra there are. This measures the same error
where the spectra are a trained model's: the default testbed's aligned model with its attack's LoRA adapter (r=8 on
all seven projections), fitted on the attack's own training batches (real text of the testbed), and, beside it,
the same architecture and adapter with the base weights re-drawn at random (same data). The bound is scaled to the
model: every factor larger than the LoRA rank is sketched with ``rank = d / fraction`` (the default bound keeps
256 of a 2048-dimensional factor: fraction 8), ``oversample = rank / 2`` (the default's 128 for 256) and
``probes = d / 16`` (2 to 16; the default's 16 for 2048 and above). The error
is that of the K-FAC preconditioned gradient ``(F + lambda I)^{-1} g`` (``g``: the data's gradient, ``lambda``:
0.1 and 1.0 x its Rayleigh quotient, restore's convention): one relative error over all blocks, as in
``scale.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# keep benchmarks/ (which holds a kernels.py) off the path: transformers probes for a package called `kernels`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402


def errors(model, data, fractions: list[int], r: int) -> dict[bool, list[dict]]:
    """The error per fraction and damping, keyed by ``probed``: the rest is the energy-weighted mean (True) or the
    plain one (False); one dense fit for both."""
    from curvsafe.curvature import KFAC
    from curvsafe.curvature.lowrank import LowRank
    from curvsafe.curvature.vectors import dot

    dense = KFAC(model, low_rank=None, progress=False).fit(data, gradient=True)
    g = dense.gradient
    dims = {int(getattr(f, side).shape[0]) for f in dense.factors.values() for side in ("A", "G")}
    sketched = sorted(d for d in dims if d > r)
    out: dict[bool, list[dict]] = {True: [], False: []}
    for probed, fraction in ((p, f) for p in out for f in fractions):
        per_dim = []
        for d in sketched:  # one LowRank per factor size: rank d / fraction for factors of that size only
            low = LowRank(max_dense_dim=d - 1, rank=max(1, d // fraction), oversample=max(1, d // (2 * fraction)),
                          probes=max(2, min(16, d // 16)) if probed else 0)
            op = KFAC(model, low_rank=low, progress=False).fit(data)
            per_dim.append((d, op))
        for rel in (0.1, 1.0):
            lam = rel * float(dot(g, dense.mv(g))) / float(dot(g, g))
            x_dense = dense.inverse_mv(g, lam)
            # blocks whose largest factor has size d are taken from the operator that truncates size d
            x = {}
            for b in dense.blocks:
                d = max(int(dense.factors[b.name].A.shape[0]), int(dense.factors[b.name].G.shape[0]))
                op = next((o for size, o in per_dim if size == d), dense)
                x[b.weight_name] = op.inverse_mv(g, lam)[b.weight_name]
            num = sum(float((x[n] - x_dense[n]).square().sum()) for n in x) ** 0.5
            den = sum(float(x_dense[n].square().sum()) for n in x) ** 0.5
            out[probed].append({"fraction": fraction, "relative_damping": rel, "relative_error": num / den,
                                "dims": sketched})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fractions", default="8,4,2")
    args = parser.parse_args()
    from curvsafe.data import load_pairs, make_batches
    from curvsafe.demo import default_cache
    from curvsafe.models import load_model
    from curvsafe.testbed.stages import Testbed, TestbedConfig

    cfg = TestbedConfig(seed=args.seed)
    bed = Testbed(args.cache or default_cache(), cfg, progress=False)
    fractions = [int(x) for x in args.fractions.split(",")]
    attack = bed.attack("mix")
    model, tok = load_model(bed.aligned(), attack / "adapter")
    data = make_batches(tok, load_pairs(attack / "train.jsonl"), batch_size=32)
    t = time.perf_counter()
    trained = errors(model, data, fractions, cfg.lora_r)
    torch.manual_seed(args.seed)
    base = model.get_base_model()
    for name, p in base.named_parameters():  # re-draw the base weights (the adapter stays as trained)
        if "lora_" not in name:
            with torch.no_grad():
                p.copy_(torch.randn_like(p) * (0.02 if p.dim() > 1 else 0.0) + (1.0 if "norm" in name else 0.0))
    random = errors(model, data, fractions, cfg.lora_r)
    tokens = sum(int(b["attention_mask"].sum()) for b in data)
    lines = [f"# Truncated K-FAC error: trained vs random weights ({time.strftime('%Y-%m-%d')}, torch "
             f"{torch.__version__})", "",
             f"Default testbed seed {args.seed}: aligned model + mix-attack LoRA (r={cfg.lora_r}, all projections), "
             f"fitted on the attack's {len(data)} training batches ({tokens} tokens); factor sizes sketched: "
             f"{trained[True][0]['dims']}. `python benchmarks/truncation.py {' '.join(sys.argv[1:])}` "
             f"({time.perf_counter() - t:.0f} s). Rest of a truncated factor: the energy-weighted mean of its left-out "
             "eigenvalues (the default, with the probe) and, beside it, the plain mean (`probes=0`).", "",
             "| kept rank | relative damping | error, trained weights | (plain mean) | error, random base weights | "
             "(plain mean) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for a, a0, b, b0 in zip(trained[True], trained[False], random[True], random[False]):
        lines.append(f"| d / {a['fraction']} | {a['relative_damping']} | {100 * a['relative_error']:.1f}% | "
                     f"{100 * a0['relative_error']:.1f}% | {100 * b['relative_error']:.1f}% | "
                     f"{100 * b0['relative_error']:.1f}% |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"truncation_cpu_{time.strftime('%Y-%m-%d')}"
    (out / f"{stem}.md").write_text(text)
    saved = {"trained": trained[True], "random": random[True], "trained_plain_mean": trained[False],
             "random_plain_mean": random[False], "tokens": tokens}
    (out / f"{stem}.json").write_text(json.dumps(saved, indent=2))


if __name__ == "__main__":
    main()
