"""Prompt/response files -> tokenised, padded Hugging Face batches.

Files: JSONL with ``prompt`` and ``response`` (BeaverTails' rows have both), or a CSV with ``goal`` and ``target``
(AdvBench). Each pair is rendered with the tokenizer's chat template when it has one (user turn = prompt,
assistant turn = response), else with the plain template ``"### Prompt:\\n{prompt}\\n### Response:\\n"`` followed
by the response and EOS. Labels are -100 on the prompt and on padding, so the loss covers response tokens only.
Batches are right-padded.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from .curvature.loss import IGNORE_INDEX

PLAIN_PROMPT = "### Prompt:\n{prompt}\n### Response:\n"
log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file that cannot be used, with the file and line in the message."""


@dataclass
class Pair:
    """One example: a prompt and its response (empty when only the prompt is known)."""

    prompt: str
    response: str


def load_pairs(path: str | Path, *, require_response: bool = True) -> list[Pair]:
    """Read prompt/response pairs from a ``.jsonl`` or ``.csv`` file (module docstring)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; expected a JSONL or CSV file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = _read_text(path)
    pairs = _read_csv(path, text) if path.suffix.lower() == ".csv" else _read_jsonl(path, text, require_response)
    if not pairs:
        raise DataError(f"{path}: no examples")
    return pairs


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a BOM is dropped); an undecodable byte is reported with its line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as "
                        f"UTF-8") from None


def _read_jsonl(path: Path, text: str, require_response: bool) -> list[Pair]:
    pairs = []
    for lineno, line in enumerate(text.splitlines(), 1):
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


def _read_csv(path: Path, text: str) -> list[Pair]:
    with io.StringIO(text, newline="") as fh:
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


def encode_pairs(tokenizer, pairs: Sequence[Pair], max_length: int) -> list[tuple[list[int], list[int]]]:
    """:func:`encode_pair` for each pair, without the examples that keep no response token.

    Sequences are cut at ``max_length`` tokens. An example whose prompt alone fills ``max_length`` keeps no
    response token: it is dropped, and a warning says how many were dropped and why (as it does for examples
    whose response was cut short). None left is an error.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    encoded, cut = [], 0
    for p in pairs:
        ids, labels = encode_pair(tokenizer, p, max_length)
        if any(label != IGNORE_INDEX for label in labels[1:]):  # the first token's label is never predicted
            encoded.append((ids, labels))
            cut += len(ids) == max_length and labels[-1] != tokenizer.eos_token_id
    if not encoded:
        raise DataError(f"none of the {len(pairs)} examples has a response token inside max_length "
                        f"({max_length} tokens): there is nothing to train or curve")
    if len(encoded) < len(pairs):
        log.warning("%d of %d examples dropped: the prompt alone fills max_length (%d tokens; at most the model's "
                    "context), leaving no response token", len(pairs) - len(encoded), len(pairs), max_length)
    if cut:
        log.warning("%d of %d examples cut at max_length (%d tokens; at most the model's context): their responses "
                    "are truncated", cut, len(pairs), max_length)
    return encoded


def make_batches(tokenizer, pairs: Sequence[Pair], *, batch_size: int = 8, max_length: int = 256,
                 limit: Optional[int] = None) -> list[dict[str, Tensor]]:
    """Tokenise pairs (:func:`encode_pairs`) and group them into padded batches (input order kept)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoded = encode_pairs(tokenizer, list(pairs)[:limit] if limit else list(pairs), max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return [collate(encoded[i:i + batch_size], pad) for i in range(0, len(encoded), batch_size)]
