"""Supervised fine-tuning loop for the testbed's full-model stages (loss on response tokens only)."""

from __future__ import annotations

import math
import random
from typing import Sequence

import torch

from ..data import Pair, collate, encode_pair


def sft(model, tokenizer, pairs: Sequence[Pair], *, epochs: int, batch_size: int = 64, lr: float = 3e-3,
        seed: int = 0, max_length: int = 64, bucket_by_length: bool = False, desc: str = "train",
        progress: bool = True) -> list[float]:
    """Train ``model`` in place with AdamW and a linear-warmup cosine schedule; returns the per-epoch mean loss.

    ``bucket_by_length``: each epoch's shuffled examples are cut into windows of 32 batches, sorted by length inside
    a window and batched, and the batches shuffled; a batch then pads to a length near its own (less padding on
    data of mixed lengths) while every example is still seen once per epoch."""
    from tqdm.auto import tqdm

    encoded = [encode_pair(tokenizer, p, max_length) for p in pairs]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    steps = epochs * math.ceil(len(encoded) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    losses = []
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    for _ in range(epochs):
        order = list(range(len(encoded)))
        rng.shuffle(order)
        window = 32 * batch_size
        if bucket_by_length:
            order = [j for w in range(0, len(order), window)
                     for j in sorted(order[w:w + window], key=lambda j: len(encoded[j][0]))]
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if bucket_by_length:
            rng.shuffle(batches)
        total, count = 0.0, 0
        for rows in batches:
            batch = collate([encoded[j] for j in rows], tokenizer.pad_token_id)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total, count = total + float(loss.detach()), count + 1
            bar.update(1)
            bar.set_postfix(loss=f"{total / count:.3f}")
        losses.append(total / count)
    bar.close()
    model.eval()
    return losses
