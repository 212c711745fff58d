"""The aligned model's own responses, recorded as the anchor of the safety objectives (below the objectives and
the evaluation: it generates with :mod:`curvsafe.eval.generate`, and neither of those imports the other)."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional, Sequence

from .curvature.loss import IGNORE_INDEX, prepare_batch
from .data import Pair, Prompt, collate
from .eval.generate import end_ids, greedy_continue, greedy_generate


@contextmanager
def adapter_disabled(model) -> Iterator[None]:
    """The base (aligned) model for the duration: PEFT's ``disable_adapter`` when there is one."""
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    with ctx:
        yield


def anchor_responses(model, tokenizer, prompts: Sequence[Prompt], *, max_new_tokens: int = 32,
                     across_ranks: bool = False) -> list[Pair]:
    """The aligned model's greedy responses to ``prompts`` (adapter disabled), as pairs; empty ones dropped.
    ``across_ranks``: generated in shards over the ``torch.distributed`` ranks, all of them on every rank."""
    with adapter_disabled(model):
        responses = greedy_generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens,
                                    across_ranks=across_ranks)
    return [Pair(p, r) for p, r in zip(prompts, responses) if r.strip()]


def batch_prompts(batches: Sequence) -> list[list[list[int]]]:
    """The prompt token ids of every row of every batch: its non-padding tokens before the first counted label
    (all of them when the row has no counted label)."""
    prompts = []
    for raw in batches:
        b = prepare_batch(raw)
        rows = []
        for ids, mask, labels in zip(b["input_ids"].tolist(), b["attention_mask"].tolist(), b["labels"].tolist()):
            kept = [(t, lab) for t, m, lab in zip(ids, mask, labels) if m]
            end = next((i for i, (_, lab) in enumerate(kept) if lab != IGNORE_INDEX), len(kept))
            rows.append([t for t, _ in kept[:end]])
        prompts.append(rows)
    return prompts


def anchor_batches(model, batches: Sequence, *, pad_id: int, eos_id, max_new_tokens: int = 32,
                   prefix_tokens: Optional[int] = 4) -> list:
    """Token-level :func:`anchor_responses`: ``model``'s greedy responses to the prompts of ``batches`` (as they
    are: no adapter is disabled), as batches of the same grouping with labels on the first ``prefix_tokens``
    response tokens. Rows whose response is empty are dropped; all empty is an error."""
    out = []
    for rows in batch_prompts(batches):
        rows = [r for r in rows if r]
        responses = greedy_continue(model, rows, pad_id=pad_id, eos_id=eos_id, max_new_tokens=max_new_tokens)
        kept = [(p + r, [IGNORE_INDEX] * len(p) + r) for p, r in zip(rows, responses) if len(r) > 1 or
                (r and r[0] not in end_ids(eos_id))]
        if kept:
            out.append(collate(kept, pad_id))
    if not out:
        raise ValueError("the model produced no response to any safety prompt: there is nothing to anchor")
    return keep_response_prefix(out, prefix_tokens)


def keep_response_prefix(batches: list, tokens: Optional[int]) -> list:
    """Batches whose labels keep only the first ``tokens`` response tokens of each row (None keeps all)."""
    if tokens is None:
        return batches
    out = []
    for b in batches:
        labels = b["labels"].clone()
        counted = (labels != IGNORE_INDEX).cumsum(dim=1)
        labels[counted > tokens] = IGNORE_INDEX
        out.append({**b, "labels": labels})
    return out
