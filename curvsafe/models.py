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


def _check_model_dir(path: str | Path, dtype: str) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a local Hugging Face model folder (no config.json)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return path


def _check_adapter_dir(adapter: str | Path) -> Path:
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json)")
    return adapter


def load_model(path: str | Path, adapter: Optional[str | Path] = None, *, dtype: str = "float32",
               device: str = "cpu", trainable_adapter: bool = False, with_tokenizer: bool = True):
    """(model, tokenizer) from a local model folder, with the PEFT adapter at ``adapter`` applied when given
    (the tokenizer is None when not ``with_tokenizer``)."""
    from transformers import AutoModelForCausalLM

    path = _check_model_dir(path, dtype)
    tokenizer = load_tokenizer(path) if with_tokenizer else None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=DTYPES[dtype]).to(device)
    except Exception as exc:  # SafetensorError (truncated file), OSError (no weights), ValueError (bad config)
        raise ModelLoadError(f"{path}: cannot load the model ({_first_line(exc)})") from None
    if adapter is not None:
        from peft import PeftModel

        adapter = _check_adapter_dir(adapter)
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


class _Checkpoint:
    """The tensors of a safetensors checkpoint (one file, or several with an index) by name, read by rows: a
    slice reads only its own bytes."""

    def __init__(self, folder: Path, file: str):
        import json

        from safetensors import safe_open

        index = folder / f"{file}.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / file).is_file():
            weight_map = None
        else:
            raise ModelLoadError(f"{folder}: no {file} or {file}.index.json (sharded loading reads safetensors "
                                 f"checkpoints; save with save_pretrained(safe_serialization=True))")
        files = sorted(set(weight_map.values())) if weight_map else [file]
        self.folder = folder
        try:
            self._files = {f: safe_open(str(folder / f), framework="pt") for f in files}
        except Exception as exc:  # SafetensorError (truncated or not safetensors), FileNotFoundError
            raise ModelLoadError(f"{folder}: cannot read the checkpoint ({_first_line(exc)})") from None
        self._where = weight_map or {k: file for k in self._files[file].keys()}
        self.keys = set(self._where)

    def shape(self, key: str) -> list[int]:
        return list(self._files[self._where[key]].get_slice(key).get_shape())

    def rows(self, key: str, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        """Rows ``start:stop`` of the tensor ``key`` (all of it by default; a 0-dim tensor whole)."""
        part = self._files[self._where[key]].get_slice(key)
        return part[:] if not part.get_shape() else part[start:stop]


def _checkpoint_key(name: str, keys: set[str], prefix: str) -> Optional[str]:
    """The checkpoint key of the base model's parameter or buffer ``name`` (its name in the model without PEFT's
    ``base_model.model.`` and ``.base_layer``), trying it with and without the model's ``base_model_prefix``."""
    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    candidates = [name, name.removeprefix(f"{prefix}.") if prefix else name, f"{prefix}.{name}" if prefix else name]
    return next((k for k in candidates if k in keys), None)


def load_sharded_model(path: str | Path, adapter: Optional[str | Path] = None, *, dtype: str = "float32",
                       trainable_adapter: bool = False, with_tokenizer: bool = True, shards: Optional[int] = None):
    """(model, tokenizer) as :func:`load_model` gives them, sharded with FSDP2 over the ranks of the process group
    (:func:`curvsafe.curvature.sharded.shard_model`), where **each rank reads only its own rows** of every weight.

    The model (and the adapter's LoRA layers) is built on the meta device, sharded, allocated on the mesh's device
    (this rank's GPU under NCCL, else the CPU), then every shard is filled from the safetensors checkpoint (its
    rows of each tensor: a memory-mapped slice, converted to ``dtype``) and every LoRA weight from the adapter
    file. So a rank's host memory holds its shard, not the model: loading whole, every rank converts the whole
    model when the checkpoint's dtype is not ``dtype`` (``benchmarks/sharded_load.py``: peak 1.06x the float32
    weights per rank from a bf16 checkpoint, against 0.52x shard by shard on 2 ranks). Buffers the checkpoint
    does not hold (rotary frequencies) keep the values the model's constructor computed. Needs safetensors files
    (``model.safetensors`` or its ``.index.json``); an adapter with ``modules_to_save`` is refused. A name the
    checkpoint lacks, or a shape that differs, is a :class:`ModelLoadError` on every rank, raised before any
    shard exists. ``shards``: HSDP, each model copy sharded over that many ranks (:func:`shard_model`).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from .curvature.sharded import is_sharded, shard_model, shard_rows

    path = _check_model_dir(path, dtype)
    tokenizer = load_tokenizer(path) if with_tokenizer else None
    checkpoint = _Checkpoint(path, "model.safetensors")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers computed on the CPU
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
        model.tie_weights()  # from_config leaves tied weights (GPT-2's head) as two parameters on meta
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot build the model ({_first_line(exc)})") from None
    prefix = model.base_model_prefix or ""
    model.eval()  # as from_pretrained leaves it
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    adapter_file = None
    if adapter is not None:
        adapter = _check_adapter_dir(adapter)
        model, adapter_file = _empty_adapter(model, adapter, trainable_adapter)
    sources = _sources(model, checkpoint, adapter_file, prefix)  # checked before any shard exists
    buffers = dict(model.named_buffers())
    shard_model(model, shards)  # no collective: the mesh spans the default group
    mesh_device = next(p for p in model.parameters() if is_sharded(p)).device_mesh.device_type
    device = torch.device("cuda", torch.cuda.current_device()) if mesh_device == "cuda" else torch.device("cpu")
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in buffers.items():
            module, _, leaf = name.rpartition(".")
            key = _checkpoint_key(name, checkpoint.keys, prefix)
            value = checkpoint.rows(key) if key is not None else buffer
            model.get_submodule(module)._buffers[leaf] = value.to(device=device, dtype=buffer.dtype)
        for name, param in model.named_parameters():
            source, key = sources[name]
            if is_sharded(param):
                param.to_local().copy_(source.rows(key, *shard_rows(param)))
            else:
                param.copy_(source.rows(key))
    return model, tokenizer


def _sources(model, checkpoint: _Checkpoint, adapter_file: Optional[_Checkpoint], prefix: str) -> dict:
    """The (file, key) each of the model's parameters is read from, by name; a name no file holds, or a shape that
    differs, is a :class:`ModelLoadError`."""
    sources = {}
    for name, param in model.named_parameters():
        if adapter_file is not None and "lora_" in name:
            source, key = adapter_file, _adapter_key(name)
        else:
            source, key = checkpoint, _checkpoint_key(name, checkpoint.keys, prefix)
        where = "adapter " + str(source.folder) if source is adapter_file else str(source.folder)
        if key is None or key not in source.keys:
            raise ModelLoadError(f"{where}: no tensor for the model's {name} (sharded loading maps names as PEFT "
                                 f"and HF save them; load without --fsdp2 to see what the files hold)")
        if source.shape(key) != list(param.shape):
            raise ModelLoadError(f"{where}: {key} has shape {source.shape(key)}, the model's {name} "
                                 f"{list(param.shape)}")
        sources[name] = source, key
    return sources


def _adapter_key(name: str, adapter_name: str = "default") -> str:
    """The key PEFT saves the LoRA parameter ``name`` under (the adapter's name dropped)."""
    return name.replace(f".{adapter_name}.", ".").removesuffix(f".{adapter_name}")


def _empty_adapter(model, adapter: Path, trainable: bool):
    """``model`` with the adapter's LoRA layers on the meta device (PEFT's own trainable flags and dtypes) and the
    adapter's weights file."""
    from peft import PeftConfig, get_peft_model

    try:
        config = PeftConfig.from_pretrained(adapter)
    except Exception as exc:
        raise ModelLoadError(f"{adapter}: cannot load the adapter ({_first_line(exc)})") from None
    if getattr(config, "modules_to_save", None):
        raise ModelLoadError(f"{adapter}: an adapter with modules_to_save is not loaded shard by shard; load it "
                             "without --fsdp2")
    config.inference_mode = not trainable
    try:
        model = get_peft_model(model, config, low_cpu_mem_usage=True)
    except Exception as exc:
        raise ModelLoadError(f"adapter {adapter} does not match model: {_first_line(exc)}") from None
    if not trainable:
        model.eval()  # as PeftModel.from_pretrained leaves an adapter loaded for inference
    return model, _Checkpoint(adapter, "adapter_model.safetensors")
