"""``curvsafe finetune``: LoRA supervised fine-tuning of a local model with the Hugging Face Trainer.

Loss on response tokens only (see :mod:`curvsafe.data`). The output folder holds the PEFT adapter (safetensors,
loads with ``PeftModel.from_pretrained``) and ``train_log.json``; it is written to a temporary folder first and
renamed, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch

from .data import Pair, collate, encode_pairs
from .io import check_out, staged_dir
from .models import fit_max_length, save_model

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SAFETY_BATCH_SIZE = 16  # CurvSafe fits one safety batch per refresh: 16 prompts spread the cost of 48 over three


class _PairDataset(torch.utils.data.Dataset):
    def __init__(self, tokenizer, pairs: Sequence[Pair], max_length: int):
        self.items = encode_pairs(tokenizer, pairs, max_length)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def lora_sft(model, tokenizer, pairs: Sequence[Pair], out: str | Path, *, r: int = 8, alpha: int = 16,
             targets: Sequence[str] = DEFAULT_TARGETS, epochs: float = 3, lr: float = 2e-3, batch_size: int = 32,
             max_length: int = 128, seed: int = 0, optimizer=None, force: bool = False,
             progress: bool = True) -> dict:
    """Add a LoRA adapter to ``model``, train it on ``pairs`` with the HF Trainer and save it to ``out``.

    ``optimizer`` (optional) is a callable ``(peft_model) -> torch optimizer`` used instead of the Trainer's AdamW
    (e.g. :func:`curvsafe_factory`); the Trainer's linear schedule is kept. The log records its class.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    from .optim import CurvSafe
    from .optim.trainer import CurvSafeLogMixin

    out = check_out(out, force)
    if not pairs:
        raise ValueError("no training pairs")
    set_seed(seed)
    present = {n.split(".")[-1] for n, _ in model.named_modules()}
    chosen = [t for t in targets if t in present]
    if not chosen:
        raise ValueError(f"none of the LoRA target modules {list(targets)} is in the model")
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=chosen, lora_dropout=0.0,
                                                  task_type="CAUSAL_LM"))
    dataset = _PairDataset(tokenizer, pairs, fit_max_length(max_length, model))
    pad = tokenizer.pad_token_id

    with staged_dir(out) as tmp:
        args = TrainingArguments(output_dir=str(tmp / "trainer"), per_device_train_batch_size=batch_size,
                                 num_train_epochs=epochs, learning_rate=lr, lr_scheduler_type="linear",
                                 warmup_steps=5, weight_decay=0.0, logging_steps=10, save_strategy="no",
                                 report_to=[], disable_tqdm=not progress, seed=seed, log_level="error",
                                 use_cpu=not torch.cuda.is_available(),
                                 remove_unused_columns=False, dataloader_num_workers=0)
        optimizers = (optimizer(peft_model), None) if optimizer is not None else (None, None)
        trainer = type("LoRATrainer", (CurvSafeLogMixin, Trainer), {})(  # CurvSafe's summary in the logs
            model=peft_model, args=args, train_dataset=dataset, optimizers=optimizers,
            data_collator=lambda items: collate(items, pad))
        if not progress:
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        result = trainer.train()
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        try:
            save_model(peft_model, tmp)
        except OSError as exc:
            raise OSError(f"cannot write {out}: {exc.strerror or exc}; nothing written") from None
        used = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
        log = {"train_loss": result.training_loss, "steps": result.global_step, "examples": len(pairs),
               "epochs": epochs, "lr": lr, "r": r, "alpha": alpha, "targets": chosen,
               "optimizer": type(used).__name__,
               **({"curvsafe": used.settings.to_dict()} if isinstance(used, CurvSafe) else {}),
               "history": [h for h in trainer.state.log_history if "loss" in h]}
        (tmp / "train_log.json").write_text(json.dumps(log, indent=2))
    peft_model.eval()
    return log


def curvsafe_factory(tokenizer, safety: Sequence[Pair], *, lr: float, batch_size: int = SAFETY_BATCH_SIZE,
                     max_length: int = 128, benign: Optional[Sequence[Pair]] = None,
                     monitor: Optional[Sequence[Pair]] = None, **options):
    """An ``optimizer`` factory for :func:`lora_sft`: :class:`curvsafe.optim.CurvSafe` around AdamW (the
    Trainer's defaults: betas (0.9, 0.999), eps 1e-8, no weight decay) protecting the refusals on ``safety``'s
    prompts, in batches of ``batch_size`` (one fitted per refresh, in turn), with ``benign`` prompts the model's
    answers to them (CurvSafe's benign side), with ``monitor`` held-out harmful prompts read at each refresh
    (CurvSafe's monitor); ``options`` go to ``CurvSafe``."""
    from .data import make_batches
    from .optim import CurvSafe

    batches = make_batches(tokenizer, safety, batch_size=batch_size, max_length=max_length)
    benign_batches, monitor_batches = (None if pairs is None else make_batches(tokenizer, pairs, batch_size=batch_size,
                                                                               max_length=max_length)
                                       for pairs in (benign, monitor))

    def factory(model):
        inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        return CurvSafe(inner, model, batches, benign_batches=benign_batches, monitor_batches=monitor_batches,
                        **options)

    return factory


def finetune(model_dir: str | Path, data: str | Path, out: str | Path, *, optimizer: Optional[str] = None,
             safety: Optional[str | Path] = None, benign: Optional[str | Path] = None, screen: Optional[float] = None,
             rescale: Optional[float] = None, monitor: Optional[str | Path] = None, **kwargs) -> dict:
    """Load a local model, read prompt/response pairs from ``data`` and run :func:`lora_sft`.

    ``optimizer="curvsafe"`` wraps AdamW in :class:`curvsafe.optim.CurvSafe`, protecting the model's refusals to
    the prompts of ``safety`` (JSONL/CSV; responses are not needed for the default anchor objective) and, with
    ``benign``, its answers to those benign prompts; ``screen``: CurvSafe's example screening at that cosine;
    ``rescale``: its rescaled update (``CurvSafeSettings.rescale``); ``monitor``: held-out harmful prompts whose
    anchor NLL's rise CurvSafe measures at each refresh (``curvsafe_monitor`` in the training log).
    """
    from .data import load_pairs
    from .models import load_model

    if optimizer not in (None, "adamw", "curvsafe"):
        raise ValueError(f"--optimizer must be adamw or curvsafe, got {optimizer!r}")
    if optimizer == "curvsafe" and safety is None:
        raise ValueError("--optimizer curvsafe needs --safety FILE (harmful prompts whose refusals to protect)")
    options = {k: v for k, v in (("screen", screen), ("rescale", rescale)) if v is not None}
    if optimizer != "curvsafe" and (safety is not None or benign is not None or monitor is not None or options):
        raise ValueError("--safety, --benign, --monitor, --screen and --rescale are only used with --optimizer "
                         "curvsafe")
    check_out(out, kwargs.get("force", False), inputs=[model_dir, data, safety, benign, monitor])
    pairs = load_pairs(data)
    safety_pairs, benign_pairs, monitor_pairs = (None if f is None else load_pairs(f, require_response=False)
                                                 for f in (safety, benign, monitor))
    model, tokenizer = load_model(model_dir)
    if safety_pairs is not None:
        kwargs["optimizer"] = curvsafe_factory(tokenizer, safety_pairs, lr=kwargs.get("lr", 2e-3),
                                               max_length=fit_max_length(kwargs.get("max_length", 128), model),
                                               benign=benign_pairs, monitor=monitor_pairs, **options)
    return lora_sft(model, tokenizer, pairs, out, **kwargs)
