"""End-to-end restoration from files: load, build objectives, restore or run a baseline, save atomically.

Output folder: ``adapter/`` (PEFT, safetensors; ``model/`` instead for ``resta``, whose edit is not a LoRA adapter),
``report.json`` and ``anchor.jsonl`` (the aligned model's responses used by the ``anchor`` objective). The folder
is written under a temporary name and renamed when complete; the input adapter is never touched.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..data import Pair, load_pairs, make_batches
from ..finetune import commit_dir, prepare_out
from ..objectives import LossTerm, Objective, adapter_disabled, build_safety, mean_nll, parse_objective
from .api import restore
from .baselines import BASELINES, resta, revert, safelora
from .preconditioners import METHODS


@dataclass
class RestoreRun:
    """What :func:`run_restore` returns: the report (as saved) and the restored model, for in-process callers."""

    report: dict
    model: object
    tokenizer: object


class NoProgressError(RuntimeError):
    """No step lowered the safety loss inside the task budget."""


def load_unaligned_state(path: str | Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return {k: v.detach() for k, v in model.state_dict().items()}


def run_restore(model_dir: str | Path, adapter_dir: Optional[str | Path], harmful_file: str | Path,
                task_file: str | Path,
                out_dir: str | Path, *, method: str = "lbfgs", objective: str = "anchor", task_budget: float = 0.02,
                task_budget_abs: float = 0.01, select_top: Optional[int] = None, iterations: int = 8,
                damping: float = 0.1, unaligned_model: Optional[str | Path] = None,
                params: Optional[Sequence[str]] = None, device: str = "cpu", dtype: str = "float32",
                force: bool = False, batch_size: int = 16, max_length: int = 128, limit: Optional[int] = None,
                anchor: Optional[list[Pair]] = None, aligned_model: Optional[str | Path] = None,
                progress: bool = True) -> RestoreRun:
    """Restore the adapter at ``adapter_dir`` on ``model_dir``; the report is also saved in ``out_dir``.

    Without ``adapter_dir``, ``model_dir`` is a full fine-tune: ``params`` (globs) picks the weights to edit and
    the ``anchor`` objective takes its anchor from ``aligned_model`` (the model before fine-tuning); the result is
    saved as a full model in ``out_dir/model``.
    """
    from ..models import load_model

    if method not in METHODS + BASELINES:
        raise ValueError(f"method must be one of {METHODS + BASELINES}, got {method!r}")
    if method in ("safelora", "resta") and unaligned_model is None:
        raise ValueError(f"{method} needs --unaligned-model (the pre-alignment weights)")
    weights = parse_objective(objective)
    full = adapter_dir is None
    if full and not params:
        raise ValueError("without --adapter (a full fine-tune) pass --params: the weights to edit")
    if full and method in BASELINES:
        raise ValueError(f"{method} edits a LoRA adapter; it needs --adapter")
    if full and ("anchor" in weights or "harmful" in weights) and aligned_model is None and anchor is None:
        raise ValueError("without --adapter the anchor / harmful objectives need --aligned-model (the model "
                         "before fine-tuning)")
    out = Path(out_dir)
    prepare_out(out, force)
    harmful_pairs = load_pairs(harmful_file, require_response="anchor" not in weights)[:limit]
    task_pairs = load_pairs(task_file)[:limit]
    try:
        model, tokenizer = load_model(model_dir, adapter_dir, dtype=dtype, device=device, trainable_adapter=True)
    except RuntimeError as exc:  # size mismatches between adapter and base
        raise ValueError(f"adapter {adapter_dir} does not match model {model_dir}: {str(exc).splitlines()[0]}")
    reference = model  # the model whose adapter-disabled self is the aligned anchor
    if full:
        import fnmatch

        for name, p in model.named_parameters():
            p.requires_grad_(any(fnmatch.fnmatchcase(name, pat) for pat in params))
        reference = load_model(aligned_model, dtype=dtype, device=device)[0] if aligned_model else None

    task = Objective([LossTerm("task", make_batches(tokenizer, task_pairs, batch_size=batch_size,
                                                    max_length=max_length))])

    def aligned_nll(batches):
        with adapter_disabled(reference):
            return float(mean_nll(reference, batches))

    if anchor is None and "anchor" in weights:
        from ..objectives import anchor_responses

        anchor = anchor_responses(reference, tokenizer, [p.prompt for p in harmful_pairs])
    safety, used = build_safety(model, tokenizer, harmful_pairs, weights, batch_size=batch_size,
                                max_length=max_length, anchor=anchor,
                                aligned_nll=aligned_nll if reference is not None else None)
    if reference is not None:
        with adapter_disabled(reference):
            aligned_safety = safety.evaluate(reference)
    else:
        aligned_safety = None
    target = aligned_safety if ("anchor" in weights or "refusal" in weights) else None

    if method in METHODS:
        result = restore(model, safety, task, method=method, params=params, task_budget=task_budget,
                         task_budget_abs=task_budget_abs, iterations=iterations, damping=damping,
                         select_top=select_top, safety_target=target, progress=progress)
        if not result.iterations and result.stopped != "safety target reached":
            raise NoProgressError(f"no step lowered the safety loss inside the task budget "
                                  f"(task loss {result.task_loss['before']:.4f}, budget "
                                  f"{result.task_loss['budget']:.4f}); loosen --task-budget")
    elif method == "revert":
        result = revert(model, safety, task, task_budget=task_budget, task_budget_abs=task_budget_abs)
    else:
        unaligned = load_unaligned_state(unaligned_model)
        fn = safelora if method == "safelora" else resta
        result = fn(model, safety, task, unaligned, task_budget=task_budget, task_budget_abs=task_budget_abs)

    report = {"method": method, "objective": weights, "model": str(model_dir),
              "adapter": None if full else str(adapter_dir),
              "harmful_loss": {"before": result.safety_loss["before"], "after": result.safety_loss["after"]},
              "safety_loss": {**result.safety_loss, "aligned": aligned_safety},
              "task_loss": result.task_loss,
              "iterations": len(result.iterations), "steps": result.iterations,
              "layer_update_norms": result.layer_update_norms, "influence": result.influence,
              "stopped": result.stopped, "seconds": result.seconds}
    if "refusal" in weights:
        report["refusal_loss"] = report["harmful_loss"]
    tmp = Path(tempfile.mkdtemp(dir=out.resolve().parent, prefix=f".{out.name}.tmp-"))
    try:
        if full:
            model.save_pretrained(tmp / "model")
            tokenizer.save_pretrained(tmp / "model")
            report["paths"] = {"model": str(out / "model")}
        elif method == "resta":
            model = model.merge_and_unload()  # aligned + safety vector + the adapter's update, as full weights
            model.save_pretrained(tmp / "model")
            tokenizer.save_pretrained(tmp / "model")
            report["paths"] = {"model": str(out / "model")}
        else:
            model.save_pretrained(tmp / "adapter")
            report["paths"] = {"adapter": str(out / "adapter")}
        if "anchor" in used:
            with (tmp / "anchor.jsonl").open("w") as fh:
                for p in used["anchor"]:
                    fh.write(json.dumps({"prompt": p.prompt, "response": p.response}) + "\n")
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return RestoreRun(report, model, tokenizer)
