"""End-to-end restoration from files: load, build objectives, restore or run a baseline, save atomically.

Output folder: ``adapter/`` (PEFT, safetensors; ``model/`` instead for ``resta``, whose edit is not a LoRA adapter),
``report.json`` and ``anchor.jsonl`` (the aligned model's responses used by the ``anchor`` objective). The folder
is written under a temporary name and renamed when complete; the input adapter is never touched.
"""

from __future__ import annotations

import json
import logging
import math
from functools import partial
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..anchors import adapter_disabled, anchor_responses
from ..config import ONE_SIDED, TWO_SIDED, RestoreConfig
from ..curvature.loss import curvature_mode
from ..curvature.sharded import whole_values
from ..data import Pair, load_pairs, make_batches, prompt_record
from ..eval.metrics import refusal_rate
from ..io import check_out, staged_dir
from ..nll import token_mean_nll
from ..objectives import HARMFUL_SIDE, LossTerm, Objective, build_safety, parse_objective
from ..plan import PlanSettings, check_fits, estimate, gib, meta_model
from ..ranks import init_from_env, is_main, shard, together, world_size
from .api import Constraint, RestoreResult, StopReason, restore
from .baselines import BASELINES, resta, revert, safelora
from .preconditioners import METHODS

log = logging.getLogger(__name__)


@dataclass
class RestoreRun:
    """What :func:`run_restore` returns: the report (as saved) and the restored model, for in-process callers."""

    report: dict
    model: object
    tokenizer: object


class NoProgressError(RuntimeError):
    """The method did not lower the safety objective (nothing is written)."""


def load_unaligned_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of the model at ``path`` (the pre-alignment weights of ``safelora`` / ``resta``)."""
    from ..models import load_model

    model = load_model(path, with_tokenizer=False)[0]
    return {k: v.detach() for k, v in model.state_dict().items()}


def _no_progress(result: RestoreResult) -> Optional[str]:
    """Why ``result`` is not a restoration (None when it is one, or when there was nothing to restore)."""
    if result.stopped in (StopReason.TARGET, StopReason.FLAT) and result.iterations == 0:
        return None  # already at the target, or nothing left to push: the input is the answer
    if result.improved:
        return None
    flags = {"task loss": "--task-budget / --task-budget-abs", "benign_nll": "--benign-budget"}
    advice = {StopReason.BUDGET: "loosen " + " or ".join(flags[name] for name in result.binding if name in flags),
              StopReason.NO_DESCENT: "try another --method or --objective"}.get(result.stopped, "")
    return f"{result.method}: {result.stop_detail}" + (f"; {advice}" if advice else "")


def _plan(model_dir, adapter_dir, dtype: str, params: Optional[Sequence[str]], batch_size: int, max_length: int,
          *, task_batches: int, safety_batches: int, ggn_rows: Optional[int], shards: int = 1, low_rank=None,
          curvature_batches: Optional[int] = None):
    """The estimate of :mod:`curvsafe.plan` for this run, from the configs (meta device)."""
    from ..capture import block_of

    model = meta_model(model_dir, adapter_dir, dtype)
    modules = None
    if params:  # a full fine-tune: the globbed weights are the trainable ones, their linear blocks the curvature
        _train_only(model, params)
        owners = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
        modules = sorted(n for n, m in model.named_modules() if n in owners and block_of(n, m) is not None) or None
    settings = PlanSettings(batch_size=batch_size, seq_len=max_length, task_batches=max(task_batches, 1),
                            safety_batches=max(safety_batches, 1), ggn_rows=ggn_rows, shards=shards,
                            curvature_batches=curvature_batches,
                            **({} if low_rank is None else {"low_rank": low_rank}))
    return estimate(model, settings, modules=modules)


def _fit_ggn_rows(plan, config: RestoreConfig, budget: Optional[int], planned):
    """For ``lbfgs`` / ``cg`` over ``budget`` with whole-batch GGN products (no ``ggn_rows`` given, not sharded):
    the largest row chunk (halving the batch) whose plan fits, with the config that uses it; else the inputs
    unchanged."""
    if (budget is None or config.method not in ("lbfgs", "cg") or config.ggn_rows is not None or config.fsdp2
            or plan.methods[config.method].peak_bytes <= budget):
        return plan, config
    rows = config.batch_size // 2
    while rows >= 1:
        trial = planned(rows)
        if trial.methods[config.method].peak_bytes <= budget:
            log.info(f"{config.method}: whole-batch GGN products would need "
                     f"{gib(plan.methods[config.method].peak_bytes)}; running them in chunks of {rows} rows "
                     "(--ggn-rows, the same products) to fit")
            return trial, RestoreConfig.from_settings(config, {"ggn_rows": rows})
        rows //= 2
    return plan, config


def _train_only(model, params: Sequence[str]) -> None:
    """Make exactly the parameters whose names match ``params`` (globs) trainable."""
    from ..capture import matches

    for name, p in model.named_parameters():
        p.requires_grad_(matches(name, params))


def _device_memory(device: str) -> Optional[int]:
    """The total memory of a CUDA ``device`` (None elsewhere: CPU memory is not checked by default)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(dev.index or 0).total_memory


def _objective_weights(config: RestoreConfig, full: bool, benign_file, unaligned_model, aligned_model
                       ) -> dict[str, float]:
    """The objective's weights (the default: two-sided with benign prompts, else one-sided), after the checks of
    the inputs each method and objective needs."""
    method = config.method
    if method in ("safelora", "resta") and unaligned_model is None:
        raise ValueError(f"{method} needs --unaligned-model (the pre-alignment weights)")
    weights = parse_objective(config.objective or (TWO_SIDED if benign_file is not None else ONE_SIDED))
    if "benign" in weights and benign_file is None:
        raise ValueError("the benign objective term needs --benign FILE (benign requests the aligned model answers)")
    if full and not config.params:
        raise ValueError("without --adapter (a full fine-tune) pass --params: the weights to edit")
    if full and method in BASELINES:
        raise ValueError(f"{method} edits a LoRA adapter; it needs --adapter")
    if config.fsdp2 and (full or method not in METHODS):
        raise ValueError(f"--fsdp2 restores a LoRA adapter (--adapter) with {', '.join(METHODS)}; "
                         + ("got a full fine-tune" if full else f"{method} (a baseline) does not run sharded"))
    if config.fsdp2 and config.ggn_rows is not None:
        raise ValueError("--ggn-rows does not run with --fsdp2 (ranks whose batches have other row counts would run "
                         "other numbers of forwards)")
    if config.fsdp2 and world_size() < 2:
        raise ValueError("--fsdp2 shards the model over the ranks of a launcher (torchrun / accelerate launch); this "
                         "process is alone")
    if config.shards is not None and world_size() % config.shards:
        raise ValueError(f"--shards {config.shards} does not divide the {world_size()} ranks (each model copy is "
                         "sharded over that many)")
    if full and aligned_model is None and ({"harmful", "anchor", "benign"} & set(weights) or benign_file):
        raise ValueError("without --adapter the anchor / harmful / benign objectives and --benign need "
                         "--aligned-model (the model before fine-tuning)")
    return weights


def _planned(model_dir, adapter_dir, config: RestoreConfig, task_examples: int, safety_examples: int):
    """(plan, config): the estimate of the run from the configs (per rank: its share of the batches), logged;
    with a memory budget (``max_memory``, or the CUDA device's), lbfgs / cg GGN row chunks that fit (recorded in
    ``config``), then the refusal of a method that does not fit. The plan is None when the model cannot be
    estimated (and no budget was asked)."""
    method, batch_size = config.method, config.batch_size

    def per_rank(examples: int) -> int:
        return math.ceil(math.ceil(examples / batch_size) / world_size())

    def planned(ggn_rows):
        return _plan(model_dir, adapter_dir, config.dtype, config.params if adapter_dir is None else None,
                     batch_size, config.max_length, task_batches=per_rank(task_examples),
                     safety_batches=per_rank(safety_examples), ggn_rows=ggn_rows,
                     shards=(config.shards or world_size()) if config.fsdp2 else 1, low_rank=config.low_rank(),
                     curvature_batches=config.curvature_batches)

    try:
        plan = planned(config.ggn_rows)
    except Exception as exc:  # the estimate is advice: a model it cannot read is restored all the same
        if config.max_memory is not None:
            raise ValueError(f"--max-memory needs the memory estimate, which failed: {exc}") from exc
        log.warning(f"no memory estimate for this model ({type(exc).__name__}: {exc})")
        return None, config
    if method in METHODS:
        budget = config.max_memory if config.max_memory is not None else _device_memory(config.device)
        plan, config = _fit_ggn_rows(plan, config, budget, planned)
        p = plan.methods[method]
        log.info(f"{method}: estimated curvature {gib(p.curvature_bytes)}, peak {gib(p.peak_bytes)} (a training "
                 f"step: {gib(plan.training_step_bytes)}), ~{p.steps_per_iteration:.0f} training steps per iteration")
        check_fits(plan, method, budget)
    return plan, config


def run_restore(model_dir: str | Path, adapter_dir: Optional[str | Path], harmful_file: str | Path,
                task_file: str | Path, out_dir: str | Path, config: Optional[RestoreConfig] = None, *,
                benign_file: Optional[str | Path] = None, unaligned_model: Optional[str | Path] = None,
                aligned_model: Optional[str | Path] = None, force: bool = False,
                anchor: Optional[list[Pair]] = None, benign_anchor: Optional[list[Pair]] = None,
                progress: bool = True, **settings) -> RestoreRun:
    """Restore the adapter at ``adapter_dir`` on ``model_dir``; the report is also saved in ``out_dir``.

    The run's settings are ``config`` (:class:`~curvsafe.config.RestoreConfig`; the defaults when None) with any
    of its fields given as keywords replacing its values (``run_restore(..., method="kfac")``); the report keeps
    them all under ``config``.

    Without ``adapter_dir``, ``model_dir`` is a full fine-tune: ``params`` (globs) picks the weights to edit and
    the ``anchor`` objective takes its anchor from ``aligned_model`` (the model before fine-tuning); the result is
    saved as a full model in ``out_dir/model``.

    ``benign_file``: benign requests (prompts; look-alikes of the harmful ones that the aligned model answers).
    With it the default objective is two-sided (:data:`TWO_SIDED`: the aligned model's behaviour on both sides
    is the target), and the benign side is a constraint: ``benign_nll`` (the aligned model's answers to those
    prompts, first 4 tokens) may not exceed ``max(before, aligned) + benign_budget`` at any accepted step, and
    every step loses its first-order component along the benign gradient when that would raise it (``None``
    drops the constraint). Under the constraint the run does not stop at the aligned anchor level (the anchor's
    prompts are not the ones users send; going past it generalises further while the constraint holds the
    benign answers), so it stops at the iteration cap, or when no step is possible. The report holds the benign
    side before and after: ``benign_nll`` and ``over_refusal`` (the keyword judge's refusal rate on those
    prompts). ``anchor`` / ``benign_anchor`` reuse previously generated aligned responses (``anchor.jsonl`` /
    ``benign_anchor.jsonl`` of an earlier run).

    Raises :class:`NoProgressError` (nothing written) when the method did not lower the safety objective. When
    the safety objective is already at its target (the aligned model's value) or flat at the start, the output
    holds the input unchanged and the report says so. A failure after an accepted step keeps the last accepted
    state: it is written, with ``stopped: "error"`` and the exception in ``error``.

    Before loading any weight, the memory and cost of ``method`` are estimated from the configs
    (:mod:`curvsafe.plan`), logged, and kept in the report (``plan``); with ``max_memory`` (bytes; by default the
    CUDA device's total memory) ``lbfgs`` / ``cg`` without ``ggn_rows`` run their GGN products in the largest row
    chunks that fit (halving the batch; recorded in the report's ``config``), and a method whose estimated peak
    still exceeds it is refused with the estimate (``MemoryError``), naming the methods that fit.

    **Data parallel.** Started by a launcher (``torchrun`` / ``accelerate launch``: ``WORLD_SIZE`` > 1), or with a
    ``torch.distributed`` process group already initialised, every rank holds the whole model and the batches
    are made from all the data, then dealt out (rank r takes batches r, r + W, ...; each objective needs at least
    one batch per rank); objectives, gradients and curvature are those of the union (the result equals one
    process's up to rounding, except ``kfac`` / ``ekfac``, whose Monte Carlo labels are drawn per rank), the
    aligned model's responses and refusal rates are generated in shards and gathered; rank 0 checks ``out_dir``
    and writes it, and a failure on any rank fails every rank and writes nothing (:mod:`curvsafe.ranks`).
    ``select_top`` is single-process only.

    **Sharded** (``fsdp2``, under a launcher): the model is built on the meta device, sharded with FSDP2 over the
    ranks, and each rank reads only its own rows of the checkpoint onto its device
    (:func:`~curvsafe.models.load_sharded_model`: safetensors files); batches are balanced
    so that every rank runs as many forwards (:func:`curvsafe.ranks.balance`); ``lbfgs`` / ``cg`` take their GGN
    products with ``J v`` in forward mode (no ``ggn_rows``); the curvature methods only, a LoRA adapter only;
    rank 0 saves the adapter from its tensors gathered whole. ``shards`` (HSDP): each copy of the model is sharded
    over that many consecutive ranks, the copies replicate one another (the data is still dealt out to every rank).
    """
    config = RestoreConfig.from_settings(config, settings)
    inputs = _load_inputs(model_dir, adapter_dir, harmful_file, task_file, out_dir, config, benign_file=benign_file,
                          unaligned_model=unaligned_model, aligned_model=aligned_model, force=force)
    side = _safety_side(inputs, anchor, benign_anchor)
    result = _apply_method(inputs, side, unaligned_model, progress)
    failure = _no_progress(result)
    if failure:
        raise NoProgressError(f"{failure}; nothing written")
    report = _report(inputs, side, result, model_dir, adapter_dir)
    model, full = inputs.model, adapter_dir is None
    adapter_state = _whole_adapter_state(model) if inputs.config.fsdp2 else None  # a collective: every rank
    with together():  # rank 0 writes once every rank got here; its failure to write fails them all
        if is_main():
            model = _write_outputs(inputs.out, model, inputs.tokenizer, report, side.used,
                                   as_model=full or inputs.config.method == "resta", full=full,
                                   adapter_state=adapter_state)
    return RestoreRun(report, model, inputs.tokenizer)


@dataclass
class _Inputs:
    """What every rank checked and loaded before the work."""

    config: RestoreConfig  # the run's settings (GGN row chunks chosen by the plan included)
    weights: dict[str, float]  # the objective's terms
    out: Path
    harmful: list[Pair]
    benign_prompts: list[str]
    plan: object  # the memory estimate (None when the model could not be estimated)
    model: object
    tokenizer: object
    max_length: int
    reference: object  # the model whose adapter-disabled self is the aligned one (None: no aligned model)
    task: Objective  # this rank's task batches


def _load_inputs(model_dir, adapter_dir, harmful_file, task_file, out_dir, config: RestoreConfig, *, benign_file,
                 unaligned_model, aligned_model, force: bool) -> _Inputs:
    """Check the inputs and ``out_dir`` (on rank 0), read the data, plan the memory and load the model(s), on
    every rank alike: a failure on one (a file missing on a node) fails all of them the same way."""
    from ..models import fit_max_length, load_model, load_sharded_model

    limit, full = config.limit, adapter_dir is None
    device = init_from_env(config.device)
    with together():
        weights = _objective_weights(config, full, benign_file, unaligned_model, aligned_model)
        if config.select_top is not None and world_size() > 1:
            raise ValueError("--select-top runs in one process only (its influence scores rank examples of every "
                             "rank); drop it or run without a launcher")
        read = [model_dir, adapter_dir, harmful_file, task_file, unaligned_model, aligned_model, benign_file]
        out = check_out(out_dir, force, inputs=read) if is_main() else Path(out_dir)
        harmful = load_pairs(harmful_file, require_response="anchor" not in weights)[:limit]
        task_pairs = load_pairs(task_file)[:limit]
        benign_prompts = ([p.prompt for p in load_pairs(benign_file, require_response=False)][:limit]
                          if benign_file is not None else [])
        plan, config = _planned(model_dir, adapter_dir, config, len(task_pairs), len(harmful) + len(benign_prompts))
        if config.fsdp2:  # each rank reads only its rows of the checkpoint (no collective: checks come first)
            model, tokenizer = load_sharded_model(model_dir, adapter_dir, dtype=config.dtype, trainable_adapter=True,
                                                  shards=config.shards)
        else:
            model, tokenizer = load_model(model_dir, adapter_dir, dtype=config.dtype, device=device,
                                          trainable_adapter=True)
        max_length = fit_max_length(config.max_length, model)
        reference = model
        if full:
            _train_only(model, config.params)
            reference = (load_model(aligned_model, dtype=config.dtype, device=device, with_tokenizer=False)[0]
                         if aligned_model else None)
        task_batches = make_batches(tokenizer, task_pairs, batch_size=config.batch_size, max_length=max_length)
        task = Objective([LossTerm("task", shard(task_batches, "batches of task data", equal=config.fsdp2))])
    return _Inputs(config, weights, out, harmful, benign_prompts, plan, model, tokenizer, max_length, reference, task)


@dataclass
class _SafetySide:
    """The safety objective, what the report shows of it before the run, and the benign side's constraint."""

    shown: Objective  # every term the report shows (the minimised ones, harmful responses, the benign side)
    objective: Objective  # the terms minimised
    used: dict  # the generated anchors, for the output folder
    target: Optional[dict]  # per harmful-side term: the aligned model's value (None: no target)
    constraints: list
    aligned_safety: Optional[float]
    aligned_terms: dict
    terms_before: dict
    refusals: dict  # the refusal rates on the benign prompts: "aligned", "before" (empty without them)


def _safety_side(inputs: _Inputs, anchor, benign_anchor) -> _SafetySide:
    """The aligned model's responses (generated in shards unless given), the safety objective, its target, the
    benign constraint and the levels before the run."""
    reference, model, tokenizer, weights = inputs.reference, inputs.model, inputs.tokenizer, inputs.weights
    harmful, benign_prompts, config = inputs.harmful, inputs.benign_prompts, inputs.config

    def aligned_nll(batches):
        with adapter_disabled(reference), torch.no_grad(), curvature_mode(reference):
            return float(token_mean_nll(reference, batches, across_ranks=True))

    if anchor is None and "anchor" in weights:
        anchor = anchor_responses(reference, tokenizer, [p.prompt for p in harmful], across_ranks=True)
    if benign_anchor is None and benign_prompts:
        benign_anchor = anchor_responses(reference, tokenizer, benign_prompts, across_ranks=True)
    # the report shows each minimised term's NLL, the harmful responses' NLL whenever the file has them (its
    # responses are refusals under `refusal`), and the benign side whenever given
    shown_weights = dict(weights)
    if not {"harmful", "refusal"} & set(weights) and all(p.response for p in harmful):
        shown_weights["harmful"] = 1.0
    if benign_prompts:
        shown_weights.setdefault("benign", 1.0)
    shown, used = build_safety(model, tokenizer, harmful, shown_weights, batch_size=config.batch_size,
                               max_length=inputs.max_length, anchor=anchor, benign_anchor=benign_anchor,
                               aligned_nll=aligned_nll if reference is not None else None,
                               shard=partial(shard, equal=config.fsdp2))
    safety = Objective([t for t in shown.terms if t.name in weights])
    aligned_safety, aligned_terms, target = None, {}, None
    if reference is not None:
        with adapter_disabled(reference):
            aligned_values, aligned_terms = safety.term_values(reference), shown.term_nlls(reference)
        aligned_safety = sum(aligned_values.values())
        target = {k: v for k, v in aligned_values.items() if k in HARMFUL_SIDE}
    terms_before = shown.term_nlls(model)
    refusals = {}
    if benign_prompts:
        with adapter_disabled(reference):
            refusals["aligned"] = refusal_rate(reference, tokenizer, benign_prompts, across_ranks=True)[0]
        refusals["before"] = refusal_rate(model, tokenizer, benign_prompts, across_ranks=True)[0]
    constraints = []
    if benign_prompts and config.benign_budget is not None:
        benign_side = Objective([LossTerm("benign", t.batches) for t in shown.terms if t.name == "benign"])
        bound = max(terms_before["benign"], aligned_terms["benign"]) + config.benign_budget
        constraints = [Constraint("benign_nll", benign_side, bound)]
        target = None
    return _SafetySide(shown, safety, used, target, constraints, aligned_safety, aligned_terms, terms_before,
                       refusals)


def _apply_method(inputs: _Inputs, side: _SafetySide, unaligned_model, progress: bool) -> RestoreResult:
    """The restore loop (``METHODS``) or the baseline, on the model in place."""
    c, model, task, safety = inputs.config, inputs.model, inputs.task, side.objective
    budgets = {"task_budget": c.task_budget, "task_budget_abs": c.task_budget_abs}
    if c.method in METHODS:
        return restore(model, safety, task, method=c.method, params=c.params, iterations=c.iterations,
                       damping=c.damping, curvature_seed=c.curvature_seed, select_top=c.select_top,
                       safety_target=side.target,
                       progress=progress and is_main(), ggn_rows=c.ggn_rows, ggn_tokens=c.ggn_tokens(),
                       loss_tokens=c.loss_tokens(),
                       constraints=side.constraints,
                       low_rank=c.low_rank(), curvature_batches=c.curvature_batches,
                       **budgets)
    if c.method == "revert":
        return revert(model, safety, task, **budgets)
    fn = safelora if c.method == "safelora" else resta
    return fn(model, safety, task, load_unaligned_state(unaligned_model), **budgets)


def _report(inputs: _Inputs, side: _SafetySide, result: RestoreResult, model_dir, adapter_dir) -> dict:
    """``report.json``'s content (README: its fields), with the levels after the run measured here."""
    model, method = inputs.model, inputs.config.method
    terms_after = side.shown.term_nlls(model)
    report = {"method": method, "objective": inputs.weights, "config": inputs.config.to_dict(),
              "model": str(model_dir), "adapter": None if adapter_dir is None else str(adapter_dir),
              "ranks": world_size(), "stopped": result.stopped.value, "stop_detail": result.stop_detail,
              "error": result.error, "safety_objective": {**result.safety_objective, "aligned": side.aligned_safety},
              "task_nll": result.task_nll}
    for name, before in side.terms_before.items():
        report[f"{name}_nll"] = {"before": before, "after": terms_after[name],
                                 "aligned": side.aligned_terms.get(name)}
    if side.constraints:
        report["benign_nll"]["bound"] = side.constraints[0].budget
    if side.refusals:
        after = refusal_rate(model, inputs.tokenizer, inputs.benign_prompts, across_ranks=True)[0]
        report["over_refusal"] = {"before": side.refusals["before"], "after": after,
                                  "aligned": side.refusals["aligned"], "prompts": len(inputs.benign_prompts)}
    plan = inputs.plan
    report.update({"iterations": result.iterations, "steps": result.steps,
                   "layer_update_norms": result.layer_update_norms, "influence": result.influence,
                   "details": result.details, "seconds": result.seconds,
                   "plan": asdict(plan.methods[method]) if plan is not None and method in METHODS else None})
    return report

def _whole_adapter_state(model) -> dict:
    """The model's state dict with its LoRA entries (the ones PEFT saves) whole: FSDP2 shards gathered."""
    state = model.state_dict()
    return {**state, **whole_values({k: v for k, v in state.items() if "lora_" in k})}


def _write_outputs(out: Path, model, tokenizer, report: dict, used: dict, *, as_model: bool, full: bool,
                   adapter_state: Optional[dict] = None):
    """The output folder, atomically: ``adapter/`` (or ``model/``: a full fine-tune, or RESTA's merged edit),
    the anchors used and ``report.json`` (its ``paths`` filled in). ``adapter_state``: the state dict to save
    the adapter from (an FSDP2-sharded model's, its LoRA entries gathered whole). Returns the model as saved."""
    from ..models import save_model

    try:
        with staged_dir(out) as tmp:
            if as_model:
                if not full:
                    model = model.merge_and_unload()  # aligned + safety vector + the adapter's update
                save_model(model, tmp / "model", tokenizer)
                report["paths"] = {"model": str(out / "model")}
            else:
                save_model(model, tmp / "adapter", state_dict=adapter_state)
                report["paths"] = {"adapter": str(out / "adapter")}
            for name, file in (("anchor", "anchor.jsonl"), ("benign", "benign_anchor.jsonl")):
                if name in used:
                    with (tmp / file).open("w") as fh:
                        for p in used[name]:
                            fh.write(json.dumps({"prompt": prompt_record(p.prompt), "response": p.response}) + "\n")
            (tmp / "report.json").write_text(json.dumps(report, indent=2))
    except OSError as exc:
        raise OSError(f"cannot write {out}: {exc.strerror or exc}; nothing written") from None
    return model
