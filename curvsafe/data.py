"""Prompt/response files -> tokenised, padded Hugging Face batches.

Files: JSONL with ``prompt`` and ``response`` (BeaverTails' rows have both), or a CSV with ``goal`` and ``target``
(AdvBench). Each pair is rendered with the tokenizer's chat template when it has one (user turn = prompt,
assistant turn = response), else with the plain template ``"### Prompt:\\n{prompt}\\n### Response:\\n"`` followed
by the response and EOS. Labels are -100 on the prompt and on padding, so the loss covers response tokens only.
Batches are right-padded.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from .curvature.loss import IGNORE_INDEX

PLAIN_PROMPT = "### Prompt:\n{prompt}\n### Response:\n"


class DataError(ValueError):
    """A data file that cannot be used, with the file and line in the message."""


@dataclass
class Pair:
    prompt: str
    response: str


def load_pairs(path: str | Path, *, require_response: bool = True) -> list[Pair]:
    """Read prompt/response pairs from a ``.jsonl`` or ``.csv`` file (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    pairs = _read_csv(path) if path.suffix.lower() == ".csv" else _read_jsonl(path, require_response)
    if not pairs:
        raise DataError(f"{path}: no examples")
    return pairs


def _read_jsonl(path: Path, require_response: bool) -> list[Pair]:
    pairs = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string 'prompt'")
            response = row.get("response", "")
            if not isinstance(response, str) or (require_response and not response):
                raise DataError(f"{path}:{lineno}: expected a non-empty string 'response'")
            pairs.append(Pair(row["prompt"], response))
    return pairs


def _read_csv(path: Path) -> list[Pair]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"goal", "target"} <= set(reader.fieldnames):
            raise DataError(f"{path}:1: a CSV needs the columns 'goal' and 'target' (AdvBench)")
        pairs = []
        for lineno, row in enumerate(reader, 2):
            if not row["goal"]:
                raise DataError(f"{path}:{lineno}: empty 'goal'")
            pairs.append(Pair(row["goal"], row["target"] or ""))
    return pairs


def render_prompt(tokenizer, prompt: str) -> str:
    """The text that precedes the response: the chat template's user turn plus generation prompt, or the plain
    template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return PLAIN_PROMPT.format(prompt=prompt)


def encode_pair(tokenizer, pair: Pair, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 on the prompt) of one pair, truncated to ``max_length``."""
    prompt_ids = tokenizer(render_prompt(tokenizer, pair.prompt), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(pair.response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return ids, labels


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad (ids, labels) examples into one batch."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(labs)] = torch.tensor(labs)
        mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def make_batches(tokenizer, pairs: Sequence[Pair], *, batch_size: int = 8, max_length: int = 256,
                 limit: Optional[int] = None) -> list[dict[str, Tensor]]:
    """Tokenise pairs and group them into padded batches (input order kept)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chosen = list(pairs)[:limit] if limit else list(pairs)
    encoded = [encode_pair(tokenizer, p, max_length) for p in chosen]
    if not any(any(label != IGNORE_INDEX for label in labs) for _, labs in encoded):
        raise DataError("no example has a response token inside max_length: there is nothing to train or curve")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return [collate(encoded[i:i + batch_size], pad) for i in range(0, len(encoded), batch_size)]
