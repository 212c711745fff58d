"""Batched greedy decoding: of token-id prompts (:func:`greedy_continue`) and of text prompts rendered like
training data, chat template or plain template (:func:`greedy_generate`)."""

from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

import torch

from ..data import Prompt, render_prompt
from ..models import model_context

log = logging.getLogger(__name__)


def end_ids(eos_id: Union[int, Sequence[int], None]) -> set[int]:
    """The end-of-sequence ids as a set (HF configs hold one id, a list of ids or None)."""
    return set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)


@torch.no_grad()
def greedy_continue(model, prompts: Sequence[Sequence[int]], *, pad_id: int,
                    eos_id: Union[int, Sequence[int], None],
                    max_new_tokens: int = 32, batch_size: int = 64, progress: bool = False) -> list[list[int]]:
    """Greedy continuations (token ids, up to and including the first end token) of token-id ``prompts``.

    ``eos_id`` is one end-of-sequence id, several (as in some HF configs) or None.

    Prompts are left-padded into batches of ``batch_size`` and decoded with the KV cache in eval mode
    (:func:`~curvsafe.curvature.loss.eval_flags`: every module's training flag is restored afterwards). An
    FSDP2-sharded model under ``torch.distributed`` decodes with HF's ``synced_gpus`` (a rank whose rows have all
    ended keeps running forwards until every rank's have, since each forward all-gathers the weights), and a rank
    with fewer batches than another (or none) decodes a one-token filler batch for each it lacks, whose output is
    dropped: every rank must call it, with any number of prompts.
    """
    from tqdm.auto import tqdm

    from ..curvature.distributed import is_distributed
    from ..curvature.loss import eval_flags
    from ..curvature.sharded import is_sharded, root_unsharded

    if any(len(p) == 0 for p in prompts):
        raise ValueError("cannot continue an empty prompt")
    device = next(model.parameters()).device
    ends = end_ids(eos_id)
    synced = is_distributed() and any(is_sharded(p) for p in model.parameters())
    batches = [[list(p) for p in prompts[start:start + batch_size]] for start in range(0, len(prompts), batch_size)]
    mine = len(batches)
    if synced:  # every rank runs as many generate calls as the rank with the most batches
        most = torch.tensor([mine], device=device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        batches += [[[pad_id]]] * (int(most) - mine)
    outputs: list[list[int]] = []
    with root_unsharded(model), eval_flags(model):
        for index, chunk in enumerate(tqdm(batches, desc="generate", disable=not progress, leave=False)):
            width = max(len(p) for p in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, seq in enumerate(chunk):
                input_ids[row, width - len(seq):] = torch.tensor(seq)
                mask[row, width - len(seq):] = 1
            generated = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                       max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                                       eos_token_id=eos_id, **({"synced_gpus": True} if synced else {}))
            if index >= mine:  # a filler batch (synced decoding)
                continue
            for row in generated[:, width:].tolist():
                stop = next((i for i, t in enumerate(row) if t in ends), None)
                if stop is not None:
                    row = row[:stop + 1]
                outputs.append(row)
    return outputs


def fit_prompts(prompts: list[list[int]], context: Optional[int], max_new_tokens: int) -> list[list[int]]:
    """Prompts cut to their last ``context - max_new_tokens`` tokens (the end holds the turn the model answers),
    with a warning saying how many were cut; unchanged when the context is unknown."""
    if context is None:
        return prompts
    room = context - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context "
                         f"({context} tokens)")
    long = sum(len(p) > room for p in prompts)
    if long:
        log.warning("%d of %d prompts do not fit the model's context (%d tokens) with %d new tokens: only their "
                    "last %d tokens are kept", long, len(prompts), context, max_new_tokens, room)
    return [p[-room:] for p in prompts]


def greedy_generate(model, tokenizer, prompts: Sequence[Prompt], *, max_new_tokens: int = 32, batch_size: int = 64,
                    progress: bool = False, across_ranks: bool = False) -> list[str]:
    """Greedy continuations of ``prompts`` (strings or conversations, :func:`~curvsafe.data.render_prompt`),
    decoded without special tokens. ``across_ranks``: under ``torch.distributed`` every rank generates its share of
    ``prompts`` and gets all the continuations (:func:`curvsafe.ranks.map_sharded`)."""
    if across_ranks:
        from ..ranks import map_sharded

        return map_sharded(lambda part: greedy_generate(model, tokenizer, part, max_new_tokens=max_new_tokens,
                                                        batch_size=batch_size, progress=progress), prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = fit_prompts([tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]
                       for p in prompts], model_context(model), max_new_tokens)
    generated = greedy_continue(model, ids, pad_id=pad, eos_id=tokenizer.eos_token_id,
                                max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in generated]
