"""``curvsafe demo``: the end-to-end curvature example on a model the project builds itself.

Builds a tiny word-level tokenizer and a random ``LlamaForCausalLM``, saves both as ordinary Hugging Face
artefacts, writes a small prompt/response JSONL, loads everything back through the same code paths as the CLI,
adds a LoRA adapter, and compares every curvature back-end's damped inverse-curvature direction
``(C + lambda I)^{-1} g`` of the LoRA gradient against the exact GGN solve (CG on exact GGN products): cosine
similarity and seconds. Writes ``report.json`` in the output folder.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

WORDS = ("add subtract two three four five six seven eight nine ten plus minus equals the answer is what "
         "reverse word list first last letter of city river mountain capital country in").split()


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<eos>", "#", ":", "\n", "Prompt", "Response"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(out)
    return fast


def write_data(path: Path, n: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    numbers = WORDS[2:11]
    with path.open("w") as fh:
        for _ in range(n):
            a, b = (numbers[int(i)] for i in torch.randint(0, len(numbers), (2,), generator=g))
            fh.write(json.dumps({"prompt": f"what is {a} plus {b}", "response": f"the answer is {a} {b}"}) + "\n")


def run_demo(out: Path, quick: bool = False) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from .curvature import EKFAC, KFAC, CGInverse, GGNOperator, empirical_fisher_diagonal, ggn_vp
    from .curvature.diag import DiagonalOperator
    from .curvature.hvp import select_params
    from .data import load_pairs, make_batches
    from .models import load_model

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model_dir = out / "model"
    tokenizer = build_tokenizer(model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    data_file = out / "data.jsonl"
    write_data(data_file, 32 if quick else 96)

    model, tokenizer = load_model(model_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    batches = make_batches(tokenizer, load_pairs(data_file), batch_size=16)
    params = select_params(model)
    grad = _mean_grad(model, batches, params)
    damping = 1e-3

    t0 = time.perf_counter()
    exact = CGInverse(GGNOperator(model, batches, list(params)), tol=1e-6, maxiter=500).inverse_mv(grad, damping)
    rows = {"exact GGN + CG": (1.0, time.perf_counter() - t0)}

    def timed(label, build):
        t = time.perf_counter()
        direction = build()
        rows[label] = (_cosine(direction, exact), time.perf_counter() - t)

    timed("K-FAC", lambda: KFAC(model, fisher_type="mc").fit(batches).inverse_mv(grad, damping))
    timed("EK-FAC", lambda: EKFAC(model, fisher_type="mc").fit(batches).inverse_mv(grad, damping))
    timed("diagonal EF", lambda: DiagonalOperator(empirical_fisher_diagonal(model, batches)).inverse_mv(grad, damping))
    timed("L-BFGS (10 GGN pairs)", lambda: _lbfgs(model, batches, params, ggn_vp, grad).inverse_mv(grad, damping))
    timed("gradient (no curvature)", lambda: grad)

    width = max(len(k) for k in rows)
    print(f"\n{'curvature':<{width}}  cos(direction, exact)  seconds")
    for label, (cos, sec) in rows.items():
        print(f"{label:<{width}}  {cos:>21.3f}  {sec:7.2f}")
    report = {"model": str(model_dir), "data": str(data_file), "damping": damping,
              "directions": {k: {"cosine_to_exact": c, "seconds": s} for k, (c, s) in rows.items()}}
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".report.")
    with os.fdopen(fd, "w") as fh:
        json.dump(report, fh, indent=2)
    os.replace(tmp, out / "report.json")
    print(f"\nreport: {out / 'report.json'}")
    return report


def _mean_grad(model, batches, params):
    from .curvature.loss import CausalLMLoss, call_model, curvature_mode, prepare_batch

    loss = CausalLMLoss()
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    with curvature_mode(model):
        for raw in batches:
            b = prepare_batch(raw)
            out = call_model(model, b)
            targets = loss.targets(b)
            valid = loss.valid(targets) & b["attention_mask"].bool()
            value = loss.token_losses(out, targets).masked_fill(~valid, 0).sum() / valid.sum()
            for (n, _), g in zip(params.items(), torch.autograd.grad(value, list(params.values()))):
                total[n] += g / len(batches)
    return total


def _lbfgs(model, batches, params, product, start, pairs: int = 10):
    """L-BFGS pairs along the Krylov sequence of ``start``: s_0 = start, s_{k+1} = y_k / |y_k|."""
    from .curvature import LBFGSInverse

    op = LBFGSInverse({n: p.shape for n, p in params.items()}, history=pairs)
    s = start
    for _ in range(pairs):
        y = product(model, batches, s, list(params))
        op.update(s, y)
        norm = sum(float(t.double().square().sum()) for t in y.values()) ** 0.5
        s = {n: t / norm for n, t in y.items()}
    return op


def _cosine(a, b) -> float:
    num = sum(float((a[n].double() * b[n].double()).sum()) for n in a)
    den = (sum(float(a[n].double().square().sum()) for n in a) * sum(float(b[n].double().square().sum())
                                                                        for n in b)) ** 0.5
    return num / den if den else 0.0
