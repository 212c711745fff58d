"""Batched greedy decoding of prompts rendered like training data (chat template or plain template)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..data import render_prompt


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 32, batch_size: int = 64,
                    progress: bool = False) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches, KV cache), decoded without special tokens."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs: list[str] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress, leave=False):
        chunk = prompts[start:start + batch_size]
        ids = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in chunk]
        width = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, width - len(seq):] = torch.tensor(seq)
            mask[row, width - len(seq):] = 1
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                   eos_token_id=tokenizer.eos_token_id)
        for row in generated[:, width:]:
            outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    model.train(was_training)
    return outputs
