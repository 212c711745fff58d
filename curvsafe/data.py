"""Prompt/response files -> tokenised, padded Hugging Face batches.

Files: JSON Lines, a JSON array of rows (any suffix: the text's first character decides) or CSV, one example per
row, in any of the shapes fine-tuning data usually comes in:

- ``prompt`` and ``response`` (BeaverTails' rows), or ``prompt`` and ``completion`` (TRL's prompt-completion
  format), strings;
- ``messages`` (TRL's and OpenAI's conversational format): turns ``{"role": ..., "content": "..."}``, an optional
  ``system`` turn first, then ``user`` and ``assistant`` turns in turn; the last assistant turn is the response and
  every turn before it the prompt; or ``prompt`` (such turns, ending in a user turn) and ``completion`` (one
  assistant turn);
- ``instruction``, optional ``input``, ``output`` (Alpaca): the prompt is the instruction, then a blank line and the
  input when there is one;
- a CSV's ``goal`` and ``target`` columns (AdvBench), or ``prompt`` and ``response`` (or ``completion``).

Files of prompts alone (harmful requests, benign ones) may leave the response out (``messages`` then ends in a user
turn). A prompt is a string (one user turn) or, with a system turn or earlier exchanges, a :data:`Conversation`:
``((role, content), ...)`` ending in the user turn. Each pair is rendered with the tokenizer's chat template when it
has one (the prompt's turns, then the response as the assistant's), else with the plain template
``"### Prompt:\\n{prompt}\\n### Response:\\n"`` followed by the response and EOS (a conversation needs the chat
template). Labels are -100 on the prompt and on padding, so the loss covers the response's tokens only (in a
conversation, the last answer's). Batches are right-padded. A judge reads a conversation's last user turn
(:func:`prompt_text`); JSON outputs hold it as its turns (:func:`prompt_record`), which read back as they were.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .curvature.loss import IGNORE_INDEX

PLAIN_PROMPT = "### Prompt:\n{prompt}\n### Response:\n"
log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file that cannot be used, with the file and line in the message."""


Conversation = tuple[tuple[str, str], ...]  # ((role, content), ...): an optional system turn, user/assistant turns
Prompt = Union[str, Conversation]  # a conversation ends in a user turn; a single user turn is kept as its string


@dataclass
class Pair:
    """One example: a prompt (module docstring) and its response (empty when only the prompt is known)."""

    prompt: Prompt
    response: str


def prompt_text(prompt: Prompt) -> str:
    """The prompt's request: the string, or a conversation's last (user) turn."""
    return prompt if isinstance(prompt, str) else prompt[-1][1]


def prompt_record(prompt: Prompt) -> Union[str, list[dict]]:
    """The prompt as JSON holds it (and :func:`load_pairs` reads it back): the string, or the conversation's turns."""
    return prompt if isinstance(prompt, str) else [{"role": r, "content": c} for r, c in prompt]


def load_pairs(path: str | Path, *, require_response: bool = True) -> list[Pair]:
    """Read prompt/response pairs from a JSON Lines, JSON (an array of rows) or CSV file (module docstring)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; expected a JSON Lines, JSON or CSV file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = _read_text(path)
    if path.suffix.lower() == ".csv":
        pairs = _read_csv(path, text, require_response)
    elif text.lstrip().startswith("["):
        pairs = _read_json_array(path, text, require_response)
    else:
        pairs = _read_jsonl(path, text, require_response)
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


def _read_json_array(path: Path, text: str, require_response: bool) -> list[Pair]:
    """A JSON document holding an array of rows (Alpaca's ``alpaca_data.json``, ``json.dump`` of a list)."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    return [_pair_of(row, require_response, f"{path}: row {i}") for i, row in enumerate(rows, 1)]


_SHAPES = ("expected 'prompt' and 'response' (or 'completion'), 'messages' (chat turns ending in the assistant's "
           "answer), or 'instruction' and 'output' (Alpaca)")


def _pair_of(row, require_response: bool, where: str) -> Pair:
    """The pair of one JSONL row in any of the module docstring's shapes; ``where`` (file:line) leads every error."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object; {_SHAPES}")
    if "messages" in row:
        prompt, response = _turns(row["messages"], where, "'messages'")
    elif "instruction" in row:
        prompt, response = _alpaca(row, where)
    elif "prompt" in row:
        key = _response_key(row)
        prompt, response = row["prompt"], row.get(key, "")
        if isinstance(prompt, list):  # TRL's conversational prompt-completion
            prompt, answer = _turns(prompt, where, "'prompt'")
            if answer:
                raise DataError(f"{where}: 'prompt' ends in an assistant turn; it must end in the user's")
        if isinstance(response, list):
            response = _answer(response, where, f"'{key}'")
        if not isinstance(prompt, (str, tuple)):
            raise DataError(f"{where}: 'prompt' must be a string or a list of chat turns")
        if not isinstance(response, str):
            raise DataError(f"{where}: '{key}' must be a string or a list of one assistant turn")
    else:
        raise DataError(f"{where}: {_SHAPES}; got the keys {sorted(row)[:8]}")
    if not prompt_text(prompt):
        raise DataError(f"{where}: empty prompt")
    if require_response and not response:
        raise DataError(f"{where}: expected a non-empty response; {_SHAPES}")
    return Pair(prompt, response)


def _response_key(keys) -> str:
    """The field holding the response next to ``prompt``: ``response``, else TRL's ``completion``."""
    return "completion" if "completion" in keys and "response" not in keys else "response"


def _turns(turns, where: str, what: str) -> tuple[Prompt, str]:
    """``(prompt, response)`` of a list of chat turns: an optional system turn, then user and assistant turns in
    turn; the response is the last turn when it is the assistant's (else empty), the prompt the turns before it (a
    single user turn as its string)."""
    if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
        raise DataError(f"{where}: {what} must be a non-empty list of {{'role': ..., 'content': ...}} turns")
    roles = [t.get("role") for t in turns]
    dialogue = roles[1:] if roles[0] == "system" else roles
    if not dialogue or any(r != ("user", "assistant")[i % 2] for i, r in enumerate(dialogue)):
        raise DataError(f"{where}: {what} has the turns {roles}; expected an optional system turn, then user and "
                        "assistant turns in turn, starting with the user's")
    contents = [t.get("content") for t in turns]
    if not all(isinstance(c, str) for c in contents):
        raise DataError(f"{where}: {what}: every turn's 'content' must be a string")
    pairs = tuple(zip(roles, contents))
    response = ""
    if roles[-1] == "assistant":
        pairs, response = pairs[:-1], contents[-1]
    return (pairs[0][1] if len(pairs) == 1 else pairs), response


def _answer(turns, where: str, what: str) -> str:
    """The content of a list of one assistant turn (TRL's conversational completion)."""
    if (not isinstance(turns, list) or len(turns) != 1 or not isinstance(turns[0], dict)
            or turns[0].get("role") != "assistant" or not isinstance(turns[0].get("content"), str)):
        raise DataError(f"{where}: {what} must be a string or a list of one assistant turn "
                        "{'role': 'assistant', 'content': '...'}")
    return turns[0]["content"]


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
            response_key = _response_key(columns)
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


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """The text that precedes the response: the chat template's turns (the prompt's, a string as one user turn)
    plus the generation prompt, or the plain template (a string only)."""
    turns = [("user", prompt)] if isinstance(prompt, str) else list(prompt)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": r, "content": c} for r, c in turns]
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # e.g. a template without a system role raises jinja2's TemplateError
            raise DataError(f"the tokenizer's chat template cannot render the turns {[r for r, _ in turns]}: "
                            f"{exc}") from None
    if len(turns) != 1:
        raise DataError(f"a conversation (the turns {[r for r, _ in turns]}) needs a tokenizer with a chat template; "
                        "this one has none (the plain template holds one user turn)")
    return PLAIN_PROMPT.format(prompt=turns[0][1])


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
