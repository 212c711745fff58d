"""Prompt/response files -> tokenised, padded Hugging Face batches.

Files: JSONL or CSV, one example per row, in any of the shapes fine-tuning data usually comes in:

- ``prompt`` and ``response`` (BeaverTails' rows), or ``prompt`` and ``completion`` (TRL's prompt-completion
  format), strings;
- ``messages`` (TRL's and OpenAI's conversational format): a user turn, then an assistant turn, each
  ``{"role": ..., "content": "..."}``; or ``prompt`` and ``completion`` as such lists of one turn each;
- ``instruction``, optional ``input``, ``output`` (Alpaca): the prompt is the instruction, then a blank line and the
  input when there is one;
- a CSV's ``goal`` and ``target`` columns (AdvBench), or ``prompt`` and ``response`` (or ``completion``).

Files of prompts alone (harmful requests, benign ones) may leave the response out (``messages`` then holds the user
turn alone). A system turn or a longer conversation is refused with the row's line: a pair is one user turn and its
answer (the chat template adds its own default system turn where it has one). Each pair is rendered with the
tokenizer's chat template when it has one (user turn = prompt, assistant turn = response), else with the plain
template ``"### Prompt:\\n{prompt}\\n### Response:\\n"`` followed by the response and EOS. Labels are -100 on the
prompt and on padding, so the loss covers response tokens only. Batches are right-padded.
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
    read = _read_csv if path.suffix.lower() == ".csv" else _read_jsonl
    pairs = read(path, text, require_response)
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
        pairs.append(_pair_of(row, require_response, f"{path}:{lineno}"))
    return pairs


_SHAPES = ("expected 'prompt' and 'response' (or 'completion'), 'messages' (a user turn, then an assistant turn), "
           "or 'instruction' and 'output' (Alpaca)")


def _pair_of(row, require_response: bool, where: str) -> Pair:
    """The pair of one JSONL row in any of the module docstring's shapes; ``where`` (file:line) leads every error."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object; {_SHAPES}")
    if "messages" in row:
        prompt, response = _turns(row["messages"], where, "'messages'")
    elif "instruction" in row:
        prompt, response = _alpaca(row, where)
    elif "prompt" in row:
        key = "completion" if "completion" in row and "response" not in row else "response"
        prompt, response = row["prompt"], row.get(key, "")
        if isinstance(prompt, list):  # TRL's conversational prompt-completion: one turn each
            prompt = _turns(prompt, where, "'prompt'")[0]
        if isinstance(response, list):
            response = _turns(response, where, f"'{key}'", alone="assistant")[1]
        if not isinstance(prompt, str):
            raise DataError(f"{where}: 'prompt' must be a string or a list of one user turn")
        if not isinstance(response, str):
            raise DataError(f"{where}: '{key}' must be a string or a list of one assistant turn")
    else:
        raise DataError(f"{where}: {_SHAPES}; got the keys {sorted(row)[:8]}")
    if not prompt:
        raise DataError(f"{where}: empty prompt")
    if require_response and not response:
        raise DataError(f"{where}: expected a non-empty response; {_SHAPES}")
    return Pair(prompt, response)


def _turns(turns, where: str, what: str, *, alone: str = "user") -> tuple[str, str]:
    """``(user content, assistant content)`` of a list of chat turns: ``[user, assistant]``, or the one turn
    ``alone`` (the other content then empty)."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise DataError(f"{where}: {what} must be a list of {{'role': ..., 'content': ...}} turns")
    roles = [t.get("role") for t in turns]
    if roles not in (["user", "assistant"], [alone]):
        raise DataError(f"{where}: {what} has the turns {roles}; curvsafe reads one user turn and its assistant "
                        "answer (no system turn, no longer conversation)")
    contents = [t.get("content") for t in turns]
    if not all(isinstance(c, str) for c in contents):
        raise DataError(f"{where}: {what}: every turn's 'content' must be a string")
    by_role = dict(zip(roles, contents))
    return by_role.get("user", ""), by_role.get("assistant", "")


def _alpaca(row: dict, where: str) -> tuple[str, str]:
    """Alpaca's ``instruction`` (and ``input``) -> the prompt, ``output`` -> the response."""
    instruction, extra, output = row["instruction"], row.get("input") or "", row.get("output", "")
    if not all(isinstance(p, str) for p in (instruction, extra, output)):
        raise DataError(f"{where}: 'instruction', 'input' and 'output' must be strings")
    return (f"{instruction}\n\n{extra}" if extra else instruction), output


def _read_csv(path: Path, text: str, require_response: bool) -> list[Pair]:
    with io.StringIO(text, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or ())
        if {"goal", "target"} <= columns:  # AdvBench
            prompt_key, response_key = "goal", "target"
        elif "prompt" in columns:
            prompt_key = "prompt"
            response_key = "completion" if "completion" in columns and "response" not in columns else "response"
        else:
            raise DataError(f"{path}:1: a CSV needs the columns 'goal' and 'target' (AdvBench) or 'prompt' and "
                            f"'response' (or 'completion'); got {sorted(columns)[:8]}")
        pairs = []
        for lineno, row in enumerate(reader, 2):
            prompt, response = row[prompt_key], row.get(response_key) or ""
            if not prompt:
                raise DataError(f"{path}:{lineno}: empty '{prompt_key}'")
            if require_response and not response:
                raise DataError(f"{path}:{lineno}: empty '{response_key}'")
            pairs.append(Pair(prompt, response))
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
