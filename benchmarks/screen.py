"""What example screening (``curvsafe.optim.screen``) costs per step, as a share of a LoRA training step.

    python benchmarks/screen.py --out benchmarks/results [--shapes 2x128,32x64,4x512] [--repeats 5] [--device cuda]

For each shape (``LAYERSxHIDDEN``: a random-init Llama, intermediate 11/4 of hidden, 4 heads, 2 KV heads, LoRA
r=8 on all seven projections, batch 16 x 32 tokens, float32; on a GPU, synchronised before each clock): a training
step (forward, backward, AdamW step)
without a screen; the same with an :class:`~curvsafe.optim.screen.ExampleScreen` capturing the per-example
gradients in the backward; and its ``apply`` at the step (score every row against a safety gradient, sum, check,
take the screened rows out). Measured in one process, the two kinds of step interleaved ``--repeats`` times, medians
over 10 timed steps each; reported as milliseconds and as shares of the plain training step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# keep benchmarks/ (which holds a kernels.py) off the path: transformers probes for a package called `kernels`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_llama(layers: int, hidden: int, device: str = "cpu"):
    """A random-init Llama of ``layers`` x ``hidden`` with LoRA r=8 on every projection, in training mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, target_modules=TARGETS, lora_dropout=0.0))
    return model.to(device).train()


def time_shape(layers: int, hidden: int, repeats: int, device: str = "cpu", steps: int = 10) -> dict:
    """Median milliseconds of a plain training step, of one with the screen's capture, and of its ``apply``."""
    from curvsafe.capture import find_blocks
    from curvsafe.optim.screen import ExampleScreen

    model = lora_llama(layers, hidden, device)
    blocks = find_blocks(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=1e-4)
    safety = {n: torch.randn_like(p) for n, p in params.items()}
    x = torch.randint(0, 512, (16, 32), device=device)
    plain, captured, applied = [], [], []
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def clock() -> float:
        sync()
        return time.perf_counter()

    def step(screen) -> tuple[float, float]:
        opt.zero_grad()
        t0 = clock()
        model(input_ids=x, labels=x).loss.backward()
        t1 = clock()
        if screen is not None:
            screen.apply(params, safety)
        t2 = clock()
        opt.step()
        t3 = clock()
        return t3 - t0 - (t2 - t1), t2 - t1

    for _ in range(repeats):
        for _ in range(2):  # warm-up
            step(None)
        plain += [step(None)[0] for _ in range(steps)]
        screen = ExampleScreen(model, blocks, threshold=0.05)
        step(screen)
        for _ in range(steps):
            outside, inside = step(screen)
            captured.append(outside)
            applied.append(inside)
        screen.remove()
    ms = {k: 1e3 * statistics.median(v) for k, v in (("train", plain), ("with_capture", captured),
                                                       ("apply", applied))}
    return {"shape": f"{layers}x{hidden}", "blocks": len(blocks), **ms,
            "capture_share": ms["with_capture"] / ms["train"] - 1, "apply_share": ms["apply"] / ms["train"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--shapes", default="2x128,32x64,4x512", help="LAYERSxHIDDEN, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        layers, hidden = (int(v) for v in shape.split("x"))
        rows.append(time_shape(layers, hidden, args.repeats, args.device))
        print(json.dumps(rows[-1]), flush=True)
    date = time.strftime("%Y-%m-%d")
    tag = "gpu" if torch.device(args.device).type == "cuda" else "cpu"
    where = torch.cuda.get_device_name() if tag == "gpu" else f"{torch.get_num_threads()} threads"
    lines = [f"# Example screening's cost per step ({tag}, {date}, {where}, torch {torch.__version__})", "",
             f"`python benchmarks/screen.py --shapes {args.shapes} --repeats {args.repeats} --device {args.device}`: "
             "random-init Llama "
             "(LAYERSxHIDDEN), LoRA r=8 on all seven projections, batch 16 x 32 tokens, float32; medians of "
             f"{args.repeats} x 10 interleaved steps.", "",
             "| shape | protected blocks | training step ms | with capture ms | apply ms | capture / step | apply / "
             "step |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['blocks']} | {r['train']:.1f} | {r['with_capture']:.1f} | "
                     f"{r['apply']:.1f} | {100 * r['capture_share']:.0f}% | {100 * r['apply_share']:.0f}% |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"screen_{tag}_{date}.md").write_text(text)
    (out / f"screen_{tag}_{date}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
