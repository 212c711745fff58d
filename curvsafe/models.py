"""Load local Hugging Face models (never from a hub) and optional PEFT adapters; save them with clear errors.

Every failure to read a model, tokenizer or adapter becomes a one-line :class:`ModelLoadError` (a
``ValueError``) naming the folder and what is wrong with it; a failure to write becomes an ``OSError`` naming
the folder.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                            r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)")


class ModelLoadError(ValueError):
    """A model, tokenizer or adapter folder that cannot be loaded (the folder and the reason in one line)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def describe_mismatch(exc: BaseException) -> str:
    """A short description of the size mismatches in PyTorch's ``load_state_dict`` error (or its first line)."""
    found = _SIZE_MISMATCH.findall(str(exc))
    if not found:
        return _first_line(exc)
    name, saved, current = found[0]
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return f"{len(found)} tensor(s) differ in shape, e.g. {name}: adapter {saved}, model {current}{more}"


def model_context(model) -> Optional[int]:
    """The longest sequence the model was built for (``max_position_embeddings`` / ``n_positions``), if known."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_tokenizer(path: str | Path):
    """The tokenizer saved in the local folder ``path``."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{path}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer "
                             f"with the model (tokenizer.save_pretrained)")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises ValueError / OSError / TypeError with multi-line texts
        raise ModelLoadError(f"{path}: cannot load the tokenizer ({_first_line(exc)})") from None


def load_model(path: str | Path, adapter: Optional[str | Path] = None, *, dtype: str = "float32",
               device: str = "cpu", trainable_adapter: bool = False, with_tokenizer: bool = True):
    """(model, tokenizer) from a local model folder, with the PEFT adapter at ``adapter`` applied when given
    (the tokenizer is None when not ``with_tokenizer``)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a local Hugging Face model folder (no config.json)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tokenizer = load_tokenizer(path) if with_tokenizer else None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=DTYPES[dtype]).to(device)
    except Exception as exc:  # SafetensorError (truncated file), OSError (no weights), ValueError (bad config)
        raise ModelLoadError(f"{path}: cannot load the model ({_first_line(exc)})") from None
    if adapter is not None:
        from peft import PeftModel

        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json)")
        try:
            model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable_adapter).to(device)
        except RuntimeError as exc:  # load_state_dict: size mismatches between adapter and base
            raise ModelLoadError(f"adapter {adapter} does not match model {path}: {describe_mismatch(exc)}") \
                from None
        except Exception as exc:  # SafetensorError (truncated), ValueError (bad config), KeyError, ...
            raise ModelLoadError(f"{adapter}: cannot load the adapter ({_first_line(exc)})") from None
    return model, tokenizer


def save_model(model, folder: str | Path, tokenizer=None, state_dict: Optional[dict] = None) -> None:
    """``model.save_pretrained(folder)`` (and the tokenizer's; ``state_dict``: the weights to save instead of the
    model's own); a failed write raises an ``OSError`` with its errno (safetensors reports disk-full and
    file-size-limit errors as its own exception type)."""
    try:
        model.save_pretrained(folder, **({} if state_dict is None else {"state_dict": state_dict}))
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    except OSError:
        raise
    except Exception as exc:
        from safetensors import SafetensorError

        if not isinstance(exc, SafetensorError):
            raise
        code = re.search(r"os error (\d+)", str(exc))
        if code:
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(folder)) from None
        raise OSError(f"cannot write {folder}: {exc}") from None


def fit_max_length(max_length: int, model) -> int:
    """``max_length`` capped at the model's context: positions past it are outside what the model was trained
    on (Llama's RoPE would accept them silently). :func:`curvsafe.data.make_batches` warns when it cuts a
    sequence, so a cap that cuts data is reported there."""
    context = model_context(model)
    return min(max_length, context) if context is not None else max_length
