"""Curvature engine: measured errors against the test oracles, and the cost of curvature products.

    python benchmarks/curvature.py --out benchmarks/results

1. Errors (relative Frobenius) of hvp, K-FAC and EK-FAC against the oracles the tests assert on (dense autograd
   Hessians, curvlinops), reusing the tests' own oracle code, so the numbers are the tests' numbers.
2. Cost of one Hessian-vector product (forward-over-reverse and double backward), one GGN- and one empirical-
   Fisher-vector product relative to one gradient (forward + backward of the same mean loss) on a tiny Llama with
   LoRA, float32: medians of repeated runs in this process, side by side.
3. A GGN-vector product over many small batches of short sequences, one pass per batch against merged passes
   (``max_tokens``, what restore's lbfgs / cg run), side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# keep benchmarks/ (which holds a kernels.py) off the path: transformers probes for a package called `kernels`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import TinyMLPLM, make_batch, random_vector, rel_err, tiny_gpt2, tiny_llama, tiny_qwen2, with_lora  # noqa: E402
from test_ekfac import LastTokenLM, dense  # noqa: E402
from test_hvp import dense_hessian, flat  # noqa: E402
from test_kfac import curvlinops_kfac  # noqa: E402

from curvsafe.curvature import EKFAC, KFAC, empirical_fisher_vp, ggn_vp, hvp, select_params  # noqa: E402
from curvsafe.curvature.loss import (CausalLMLoss, call_model, counted_token_losses, curvature_mode,  # noqa: E402
                                     prepare_batch)


def oracle_errors() -> dict[str, float]:
    errors = {}
    torch.manual_seed(0)
    mlp = TinyMLPLM().double()
    batches = [make_batch(seed=1), make_batch(seed=2, batch=2)]
    params = select_params(mlp)
    H = dense_hessian(mlp, batches, params)
    v = random_vector(params)
    for method in ("forward", "double_backward"):
        errors[f"hvp tiny MLP ({method}) vs dense Hessian"] = rel_err(flat(hvp(mlp, batches, v, method=method)),
                                                                      H @ flat(v))
    lora = with_lora(tiny_llama())
    params = select_params(lora)
    H = dense_hessian(lora, [make_batch()], params)
    v = random_vector(params)
    errors["hvp LoRA tiny Llama (sdpa) vs dense Hessian"] = rel_err(flat(hvp(lora, [make_batch()], v)), H @ flat(v))

    batch = make_batch(pad=False, prompt=0)
    n, t = batch["input_ids"].shape
    for label, make in (("Llama", tiny_llama), ("Qwen2", tiny_qwen2), ("GPT-2", tiny_gpt2)):
        for approx in ("expand", "reduce"):
            model = make()
            ours = KFAC(model, kfac_approx=approx).fit([batch])
            ref = curvlinops_kfac(model, ours.blocks, batch, "empirical", approx)
            errors[f"K-FAC A {label} {approx} vs curvlinops"] = max(
                rel_err(f.A, ref._input_covariances[f"m.{name}"]) for name, f in ours.factors.items())
            errors[f"K-FAC G {label} {approx} vs curvlinops"] = max(
                rel_err(f.G * n * t, ref._gradient_covariances[f"m.{name}"]) for name, f in ours.factors.items())

    from curvlinops import EKFACLinearOperator

    model = with_lora(tiny_llama())
    ebatch = make_batch(batch=6, seq=9, pad=False, prompt=0)
    ebatch["labels"][:, :-1] = -100
    ours = EKFAC(model).fit([ebatch])
    ref = EKFACLinearOperator(LastTokenLM(model).eval(), torch.nn.CrossEntropyLoss(reduction="sum"),
                              [model.get_submodule(b.name).weight for b in ours.blocks],
                              [(ebatch["input_ids"], ebatch["input_ids"][:, -1])], fisher_type="empirical",
                              check_deterministic=False)
    n, t = ebatch["input_ids"].shape
    errors["EK-FAC LoRA Llama dense operator vs curvlinops"] = rel_err(
        dense(ours.to_scipy(), ours.dim), dense(ref.to_scipy(), ref.shape[0]) / (n * t))
    return errors


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def product_costs(repeats: int) -> dict[str, dict[str, float]]:
    """Seconds and ratio to one gradient, tiny Llama (hidden 64, 4 layers) with LoRA on all projections."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    model = with_lora(LlamaForCausalLM(cfg), targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj",
                                                       "down_proj", "gate_proj"), r=8)
    batches = [make_batch(batch=8, seq=64, vocab=512, seed=s) for s in range(2)]
    params = select_params(model)
    v = random_vector(params)
    loss = CausalLMLoss()

    def gradient():
        with curvature_mode(model):
            for raw in batches:
                b = prepare_batch(raw)
                out = call_model(model, b)
                targets = loss.targets(b)
                valid = loss.valid(targets) & b["attention_mask"].bool()
                value = counted_token_losses(loss, out, targets, valid).sum() / valid.sum()
                torch.autograd.grad(value, list(params.values()))

    runs = {"gradient": gradient,
            "hvp (forward-over-reverse)": lambda: hvp(model, batches, v, method="forward"),
            "hvp (double backward)": lambda: hvp(model, batches, v, method="double_backward"),
            "ggn_vp": lambda: ggn_vp(model, batches, v),
            "empirical_fisher_vp": lambda: empirical_fisher_vp(model, batches, v)}
    seconds = {k: median_seconds(fn, repeats) for k, fn in runs.items()}
    return {k: {"seconds": s, "ratio_to_gradient": s / seconds["gradient"]} for k, s in seconds.items()}


def merged_pass_costs(repeats: int) -> dict[str, float]:
    """One GGN-vector product over 16 batches of 16 short rows (12-40 tokens, a restore's task batches on the
    testbed), one pass per batch against the batches merged into passes of up to 16 x 128 tokens (restore's
    default ``ggn_tokens``): seconds, their ratio, and the relative difference of the products (float rounding)."""
    torch.manual_seed(0)
    model = with_lora(tiny_llama(dtype=torch.float32))
    g = torch.Generator().manual_seed(0)
    batches = [make_batch(batch=16, seq=int(torch.randint(12, 41, (1,), generator=g)), seed=s) for s in range(16)]
    params = select_params(model)
    v = random_vector(params)
    per_batch, merged = ggn_vp(model, batches, v), ggn_vp(model, batches, v, max_tokens=16 * 128)
    diff = rel_err(flat(merged), flat(per_batch))
    seconds = {"one pass per batch": median_seconds(lambda: ggn_vp(model, batches, v), repeats),
               "merged passes": median_seconds(lambda: ggn_vp(model, batches, v, max_tokens=16 * 128), repeats)}
    return {**seconds, "speed-up": seconds["one pass per batch"] / seconds["merged passes"],
            "relative difference": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    errors = oracle_errors()
    costs = product_costs(args.repeats)
    merging = merged_pass_costs(args.repeats)
    lines = [f"# Curvature engine: oracle errors and product costs ({time.strftime('%Y-%m-%d')}, torch "
             f"{torch.__version__}, {torch.get_num_threads()} CPU threads)", "",
             "| check | relative error |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2e} |" for k, v in errors.items()]
    lines += ["", f"Tiny Llama + LoRA (hidden 64, 4 layers, r=8, 2 batches of 8x64 tokens), float32, median of "
              f"{args.repeats} runs:", "", "| product | ms | / gradient |", "| --- | ---: | ---: |"]
    lines += [f"| {k} | {c['seconds'] * 1e3:.1f} | {c['ratio_to_gradient']:.2f} |" for k, c in costs.items()]
    lines += ["", f"GGN-vector product over 16 batches of 16 rows x 12-40 tokens (a restore's task batches on the "
              f"testbed; the tiny Llama of the tests + LoRA, float32), median of {args.repeats} runs: one pass per "
              f"batch {merging['one pass per batch'] * 1e3:.0f} ms, merged into passes of up to 16 x 128 tokens "
              f"{merging['merged passes'] * 1e3:.0f} ms, **{merging['speed-up']:.2f}x**; the products differ by "
              f"{merging['relative difference']:.1e} (relative; float rounding)."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"curvature_cpu_{time.strftime('%Y-%m-%d')}"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps({"errors": errors, "costs": costs, "merged_passes": merging},
                                                 indent=2))


if __name__ == "__main__":
    main()
