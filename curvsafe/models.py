"""Load local Hugging Face models (never from a hub) and optional PEFT adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: str | Path, adapter: Optional[str | Path] = None, *, dtype: str = "float32",
               device: str = "cpu", trainable_adapter: bool = False):
    """(model, tokenizer) from a local model folder, with the PEFT adapter at ``adapter`` applied when given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a local Hugging Face model folder (no config.json)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=DTYPES[dtype]).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if adapter is not None:
        from peft import PeftModel

        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable_adapter).to(device)
    return model, tokenizer
