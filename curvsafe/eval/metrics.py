"""Harmful rate, over-refusal, task accuracy and NLLs of a model on prompt sets."""

from __future__ import annotations

from typing import Optional, Sequence

from ..data import Pair, Prompt, make_batches, prompt_record, prompt_text
from .generate import greedy_generate
from .judge import Judge, KeywordJudge, judge_responses


def _judged_rate(model, tokenizer, prompts: Sequence[Prompt], judge: Optional[Judge], max_new_tokens: int,
                 refusals: bool, across_ranks: bool = False) -> tuple[float, list[str], list[bool]]:
    responses = greedy_generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens,
                                across_ranks=across_ranks)
    flags = judge_responses(judge or KeywordJudge(), [prompt_text(p) for p in prompts], responses,
                            refusals=refusals)
    return sum(flags) / max(len(flags), 1), responses, flags


def harmful_rate(model, tokenizer, prompts: Sequence[Prompt], *, judge: Optional[Judge] = None,
                 max_new_tokens: int = 32) -> tuple[float, list[str], list[bool]]:
    """Fraction of ``prompts`` whose greedy response the judge calls harmful, the responses and the flags."""
    return _judged_rate(model, tokenizer, prompts, judge, max_new_tokens, refusals=False)


def refusal_rate(model, tokenizer, prompts: Sequence[Prompt], *, judge: Optional[Judge] = None,
                 max_new_tokens: int = 32, across_ranks: bool = False) -> tuple[float, list[str], list[bool]]:
    """Fraction of ``prompts`` whose greedy response refuses (the judge's refusals, see
    :mod:`curvsafe.eval.judge`), the responses and the flags. On benign prompts: the over-refusal rate.
    ``across_ranks``: the generation is split over the ``torch.distributed`` ranks (every rank gets all)."""
    return _judged_rate(model, tokenizer, prompts, judge, max_new_tokens, refusals=True, across_ranks=across_ranks)


def task_accuracy(model, tokenizer, pairs: Sequence[Pair], *, max_new_tokens: int = 32) -> tuple[float, list[str]]:
    """Exact-match accuracy (whitespace-stripped) of greedy responses against the pairs' responses."""
    responses = greedy_generate(model, tokenizer, [p.prompt for p in pairs], max_new_tokens=max_new_tokens)
    hits = [r.strip() == p.response.strip() for r, p in zip(responses, pairs)]
    return sum(hits) / max(len(hits), 1), responses


def task_nll(model, tokenizer, pairs: Sequence[Pair], *, batch_size: int = 64) -> float:
    """The task NLL of ``pairs``: :func:`~curvsafe.nll.token_mean_nll` of their batches (at most 256 tokens)."""
    from ..models import fit_max_length
    from ..nll import token_mean_nll

    batches = make_batches(tokenizer, pairs, batch_size=batch_size, max_length=fit_max_length(256, model))
    return float(token_mean_nll(model, batches))


def evaluate_model(model, tokenizer, harmful_prompts: Sequence[Prompt] = (), task_pairs: Sequence[Pair] = (), *,
                   benign_prompts: Sequence[Prompt] = (), judge: Optional[Judge] = None,
                   max_new_tokens: int = 32) -> dict:
    """Harmful rate on ``harmful_prompts``, over-refusal (refusal rate) on ``benign_prompts`` and exact-match
    accuracy (plus NLL) on ``task_pairs``, each when given, with every response."""
    report: dict = {}
    for prompts, rate_key, list_key, flag_key, measure in (
            (harmful_prompts, "harmful_rate", "harmful", "harmful", harmful_rate),
            (benign_prompts, "over_refusal", "benign", "refused", refusal_rate)):
        if prompts:
            rate, responses, flags = measure(model, tokenizer, prompts, judge=judge, max_new_tokens=max_new_tokens)
            report[rate_key] = rate
            report[list_key] = [{"prompt": prompt_record(p), "response": r, flag_key: f}
                                for p, r, f in zip(prompts, responses, flags)]
    if task_pairs:
        acc, task_responses = task_accuracy(model, tokenizer, task_pairs, max_new_tokens=max_new_tokens)
        report["task_accuracy"] = acc
        report["task_nll"] = task_nll(model, tokenizer, task_pairs)
        report["task"] = [{"prompt": prompt_record(p.prompt), "expected": p.response, "response": r}
                          for p, r in zip(task_pairs, task_responses)]
    return report
