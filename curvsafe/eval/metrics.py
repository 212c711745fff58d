"""Harmful rate, task accuracy and NLLs of a model on prompt sets."""

from __future__ import annotations

from typing import Optional, Sequence

from ..data import Pair, make_batches
from .generate import greedy_generate
from .judge import Judge, KeywordJudge, judge_responses


def harmful_rate(model, tokenizer, prompts: Sequence[str], *, judge: Optional[Judge] = None,
                 max_new_tokens: int = 32) -> tuple[float, list[str], list[bool]]:
    """Fraction of ``prompts`` whose greedy response the judge calls harmful, the responses and the flags."""
    responses = greedy_generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens)
    flags = judge_responses(judge or KeywordJudge(), prompts, responses)
    return sum(flags) / max(len(flags), 1), responses, flags


def task_accuracy(model, tokenizer, pairs: Sequence[Pair], *, max_new_tokens: int = 32) -> tuple[float, list[str]]:
    """Exact-match accuracy (whitespace-stripped) of greedy responses against the pairs' responses."""
    responses = greedy_generate(model, tokenizer, [p.prompt for p in pairs], max_new_tokens=max_new_tokens)
    hits = [r.strip() == p.response.strip() for r, p in zip(responses, pairs)]
    return sum(hits) / max(len(hits), 1), responses


def mean_nll(model, tokenizer, pairs: Sequence[Pair], *, batch_size: int = 64) -> float:
    """Mean NLL per response token over the pairs (token-weighted over batches)."""
    from ..objectives import mean_nll as batches_mean_nll

    from ..models import fit_max_length

    batches = make_batches(tokenizer, pairs, batch_size=batch_size, max_length=fit_max_length(256, model))
    return float(batches_mean_nll(model, batches))


def evaluate_model(model, tokenizer, harmful_prompts: Sequence[str], task_pairs: Sequence[Pair] = (), *,
                   judge: Optional[Judge] = None, max_new_tokens: int = 32) -> dict:
    """Harmful rate on ``harmful_prompts`` and exact-match accuracy (plus NLL) on ``task_pairs``, with every
    response."""
    rate, responses, flags = harmful_rate(model, tokenizer, harmful_prompts, judge=judge,
                                          max_new_tokens=max_new_tokens)
    report = {"harmful_rate": rate, "harmful": [{"prompt": p, "response": r, "harmful": f}
                                                for p, r, f in zip(harmful_prompts, responses, flags)]}
    if task_pairs:
        acc, task_responses = task_accuracy(model, tokenizer, task_pairs, max_new_tokens=max_new_tokens)
        report["task_accuracy"] = acc
        report["task_nll"] = mean_nll(model, tokenizer, task_pairs)
        report["task"] = [{"prompt": p.prompt, "expected": p.response, "response": r}
                          for p, r in zip(task_pairs, task_responses)]
    return report
