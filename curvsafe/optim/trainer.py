"""CurvSafe in the HF Trainer and TRL's trainers: the optimizer made where the Trainer makes its own.

``Trainer(..., optimizers=(CurvSafe(...), None))`` runs in one process and under DDP, but the Trainer refuses it
whenever FSDP is enabled ("Passing `optimizers` is not allowed if PyTorch FSDP is enabled"), which is how a
model past one GPU is trained. :class:`CurvSafeTrainerMixin` instead overrides ``create_optimizer``: the
Trainer's own optimizer (its optimizer class from ``args.optim``, learning rate, weight-decay groups) is made as
usual, then wrapped in :class:`~curvsafe.optim.CurvSafe` with the safety data given to the trainer. Under FSDP2
the Trainer makes the optimizer on the unsharded model and accelerate then shards the model and swaps the
optimizer's parameters; CurvSafe adopts the sharded parameters at its next step (see its docstring).

    from transformers import Trainer
    from trl import SFTTrainer
    from curvsafe.optim import CurvSafeTrainer, CurvSafeTrainerMixin

    trainer = CurvSafeTrainer(model=model, args=args, train_dataset=ds, safety_data=harmful_prompts,
                              safety_tokenizer=tokenizer)

    class CurvSafeSFTTrainer(CurvSafeTrainerMixin, SFTTrainer):
        pass

Under a launcher each rank passes its own shard of the safety data (as to ``CurvSafe`` itself).

Checkpoints: the Trainer saves the optimizer's ``state_dict`` from rank 0 only (one process, DDP), and under FSDP
through ``torch.distributed.checkpoint``, which keeps only ``state`` and ``param_groups``. Either way CurvSafe's
own state (anchors of each rank's safety shard, factors, guard) would be lost or come from rank 0, so the mixin
saves it per rank beside the checkpoint (``curvsafe_rank{R}_of_{W}.pt``) and restores it on resume; a resume with
another number of ranks is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from .curvsafe import CurvSafe
from .settings import CurvSafeSettings

# the summary's fields in the logs (curvsafe_*)
LOGGED = ("kept", "guard", "refreshes", "damped", "effective_rank", "screened", "monitor")


class CurvSafeLogMixin:
    """Mix into a ``transformers.Trainer`` subclass (before it) whose optimizer is a CurvSafe, given or made: its
    training logs (``log_history``, the reporters) gain what CurvSafe did since the last log. Without a CurvSafe the
    logs are the Trainer's own."""

    def _curvsafe(self) -> Optional[CurvSafe]:
        """The CurvSafe in ``self.optimizer`` (accelerate wraps it in an ``AcceleratedOptimizer``), or None."""
        optimizer = getattr(self, "optimizer", None)
        while optimizer is not None and not isinstance(optimizer, CurvSafe):
            optimizer = getattr(optimizer, "optimizer", None)
        return optimizer

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """The Trainer's training logs, with what CurvSafe did since the last one (``curvsafe_kept``: the share of
        the updates' energy its projection kept, ``curvsafe_guard``: the share its guard's correction took,
        ``curvsafe_refreshes``; with a projection ``curvsafe_damped`` and ``curvsafe_effective_rank``, of the safety
        curvature at the latest refresh; with ``screen`` ``curvsafe_screened``, the share of training examples
        screened; with ``monitor_batches`` ``curvsafe_monitor``, the held-out monitor's rise at the latest refresh;
        :meth:`~curvsafe.optim.constraint.SafetyConstraint.summary`)."""
        curvsafe = self._curvsafe()
        if curvsafe is not None and "loss" in logs:
            done = curvsafe.constraint.summary()
            logs = {**logs, **{f"curvsafe_{k}": done[k] for k in LOGGED if k in done}}
        super().log(logs, *args, **kwargs)


class CurvSafeTrainerMixin(CurvSafeLogMixin):
    """Mix into a ``transformers.Trainer`` subclass (before it) to train with CurvSafe around its optimizer.

    Keyword arguments taken before the trainer's own: ``safety_data`` (as ``CurvSafe``'s ``safety_batches``:
    prompt strings with ``safety_tokenizer``, or HF batches), ``benign_data`` (its ``benign_batches``),
    ``monitor_data`` (its ``monitor_batches``), ``curvsafe_settings`` (a :class:`~curvsafe.optim.CurvSafeSettings`)
    and ``curvsafe_options`` (fields that replace the settings', and ``CurvSafe``'s other keywords such as
    ``pad_id``).
    """

    def __init__(self, *args, safety_data, benign_data=None, monitor_data=None, safety_tokenizer=None,
                 curvsafe_settings: Optional[CurvSafeSettings] = None,
                 curvsafe_options: Optional[dict[str, Any]] = None, **kwargs):
        if kwargs.get("optimizers", (None, None))[0] is not None:
            raise ValueError("CurvSafe trainers make their optimizer themselves (around the Trainer's own): drop "
                             "optimizers=, or pass a CurvSafe to a plain Trainer instead")
        self._curvsafe_args = {"safety_batches": safety_data, "benign_batches": benign_data,
                               "monitor_batches": monitor_data, "tokenizer": safety_tokenizer,
                               "settings": curvsafe_settings,
                               **(curvsafe_options or {})}
        super().__init__(*args, **kwargs)

    def create_optimizer(self, *args, **kwargs):
        """The Trainer's optimizer, wrapped in CurvSafe once."""
        optimizer = super().create_optimizer(*args, **kwargs)
        if not isinstance(optimizer, CurvSafe):
            model = (args[0] if args else kwargs.get("model")) or self.model  # the prepared model when given
            self.optimizer = optimizer = CurvSafe(optimizer, model, **self._curvsafe_args)
        return optimizer

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The Trainer's optimizer and scheduler files, and this rank's CurvSafe state beside them."""
        super()._save_optimizer_and_scheduler(output_dir)
        curvsafe = self._curvsafe()
        if curvsafe is not None:
            path = Path(output_dir) / safety_state_file(self.args.process_index, self.args.world_size)
            path.parent.mkdir(parents=True, exist_ok=True)  # other ranks may get here before rank 0 made it
            tmp = path.with_name(path.name + ".tmp")
            torch.save(curvsafe.safety_state_dict(), tmp)
            os.replace(tmp, path)

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        """The Trainer's optimizer and scheduler states, then this rank's CurvSafe state from the checkpoint."""
        super()._load_optimizer_and_scheduler(checkpoint)
        curvsafe = self._curvsafe()
        if checkpoint is None or curvsafe is None:
            return
        path = Path(checkpoint) / safety_state_file(self.args.process_index, self.args.world_size)
        if not path.is_file():
            saved = sorted(p.name for p in Path(checkpoint).glob("curvsafe_rank*.pt"))
            if saved:
                raise ValueError(f"the checkpoint {checkpoint} holds CurvSafe states of another number of ranks "
                                 f"({', '.join(saved[:4])}); resume with the ranks it was saved with "
                                 f"(this run has {self.args.world_size})")
            return  # an older checkpoint: its optimizer file decides (CurvSafe warns when its state is missing)
        curvsafe.load_safety_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def safety_state_file(rank: int, ranks: int) -> str:
    """The checkpoint file of rank ``rank``'s CurvSafe state in a run of ``ranks`` processes."""
    return f"curvsafe_rank{rank}_of_{ranks}.pt"


def __getattr__(name: str):
    if name == "CurvSafeTrainer":  # made on first use: importing transformers' Trainer is slow
        from transformers import Trainer

        cls = type("CurvSafeTrainer", (CurvSafeTrainerMixin, Trainer),
                   {"__doc__": "``transformers.Trainer`` with CurvSafe around its optimizer "
                               "(:class:`CurvSafeTrainerMixin`).", "__module__": __name__})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
