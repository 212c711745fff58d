"""``restore()``: curvature-preconditioned safety restoration under a task-loss budget.

Formulation (ours; the paper's equations are not public). With S the safety objective (:mod:`curvsafe.objectives`,
default ``anchor``: the NLL of the aligned model's own refusals) and L the task loss, starting from the fine-tuned
parameters θ0 with task loss L0:

- budget: ``L(θ) <= L0 + max(task_budget * L0, task_budget_abs)`` (2% relative, floor 0.01 nats/token);
- each outer iteration refreshes the task curvature H at θ and takes ``Δ = -r (H + λI)^{-1} ∇J / ||...||``
  with ``J = S + μ L``: the safety descent direction in the task metric, plus a task-descent term whose weight μ
  starts at 0 and grows whenever a step that lowered S broke the budget, so that no step length met it or only a
  backtracked one did (the fine-tuned model is not at its task minimum, so descending L frees budget). When no
  step length lowered S at all with μ > 0, μ returns to 0: the task term had turned the direction away from S's
  descent, and growing it further would only stall the run (backtracking for S's own curvature, with every
  budget met, leaves μ as it is);
- the step length r is found by backtracking from a trust radius that grows after accepted steps; a step is
  accepted when L stays inside the budget and S decreases;
- it stops (:class:`StopReason`) when S reaches its target (the aligned model's own value of S), after
  ``iterations`` accepted steps, when the gradient of S vanishes (every term flat: a ``harmful`` term at its
  ceiling), or when μ has changed ``max_mu_growth`` times without an acceptable step: ``task budget binds`` if some
  trial step lowered S but broke the budget, ``no descent`` if none lowered S.

For each accepted step the report holds the second-order model's predicted changes (``ΔS ≈ ∇S·Δ``,
``ΔL ≈ ∇L·Δ + ½ Δ^T H Δ``) next to the realised ones.
"""

from __future__ import annotations

import time
from functools import partial
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ..config import RestoreConfig
from ..curvature.distributed import is_distributed
from ..curvature.loss import curvature_mode
from ..curvature.lowrank import LowRank
from ..curvature.sharded import assign_whole, is_sharded, whole_values
from ..curvature.vectors import ParamVector, dot
from ..nll import batch_nll_sums
from ..objectives import Objective, objective_gradients, objective_values
from ..ranks import is_main
from .preconditioners import make_preconditioner


class StopReason(str, Enum):
    """Why a restoration stopped (``RestoreResult.stopped``; ``stop_detail`` says it with the numbers)."""

    TARGET = "target reached"  # S at or below its target: the aligned model's own value
    ITERATIONS = "iteration cap"  # `iterations` accepted steps taken, S still above its target
    FLAT = "flat safety objective"  # the gradient of S vanished (every term at its ceiling, or no signal)
    BUDGET = "task budget binds"  # every trial step that lowered S took the task loss past its budget
    NO_DESCENT = "no descent"  # the trial steps inside the budget did not lower S
    COMPLETE = "complete"  # a baseline applied in full inside the budget
    ERROR = "error"  # an exception after an accepted step: the last accepted state is kept


@dataclass
class Constraint:
    """A quantity that no accepted step may raise past ``budget`` (besides the task loss), e.g. the NLL of the
    aligned model's answers to benign requests, so that restoring refusals does not spread them."""

    name: str
    objective: Objective
    budget: float


@dataclass
class RestoreResult:
    """What a restoration did. Losses are mean NLLs per counted response token.

    ``safety_objective``: S as minimised (``before``, ``after``, ``target``), the weighted sum of its terms, with
    ``harmful`` entering as ``-min(NLL, aligned NLL)``. ``task_nll``: the task loss (``before``, ``after``,
    ``budget``). ``steps``: one entry per accepted step; ``iterations`` is their number. ``error``: the exception
    that ended a run after an accepted step (``stopped`` is then ``error``), else None. ``details``: a baseline's
    own parameters (revert's alpha, RESTA's beta, Safe LoRA's projected layers).
    """

    method: str
    safety_objective: dict
    task_nll: dict
    steps: list = field(default_factory=list)
    layer_update_norms: dict = field(default_factory=dict)
    influence: list = field(default_factory=list)
    stopped: StopReason = StopReason.ITERATIONS
    stop_detail: str = ""
    error: Optional[str] = None
    binding: tuple = ()  # with ``task budget binds``: the budgets that stopped the steps ("task loss", constraints)
    details: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def iterations(self) -> int:
        """The number of accepted steps."""
        return len(self.steps)

    @property
    def improved(self) -> bool:
        """Whether the safety objective went down."""
        return self.safety_objective["after"] < self.safety_objective["before"]

    def to_dict(self) -> dict:
        return {**asdict(self), "stopped": self.stopped.value, "iterations": self.iterations}


def trainable_params(model, patterns=None) -> dict[str, Tensor]:
    """The parameters to edit: every ``requires_grad`` parameter (an adapter's LoRA weights), or those whose
    names match ``patterns`` (globs)."""
    from ..capture import matches

    named = dict(model.named_parameters())
    if patterns:
        chosen = {n: p for n, p in named.items() if matches(n, patterns)}
    else:
        chosen = {n: p for n, p in named.items() if p.requires_grad}
    if not chosen:
        raise ValueError("no parameters to restore: load the adapter as trainable or pass params patterns")
    return chosen


def _snapshot(params: Mapping[str, Tensor]) -> ParamVector:
    """Whole copies of the parameters (never aliases; FSDP2 shards gathered: every rank must call it)."""
    return whole_values(params)


def _assign(params: Mapping[str, Tensor], values: Mapping[str, Tensor]) -> None:
    assign_whole(params, values)


def budget_of(l0: float, rel: float, abs_floor: float) -> float:
    """The most the task loss may reach: ``l0`` plus ``rel * |l0|``, at least ``abs_floor``."""
    return l0 + max(rel * abs(l0), abs_floor)


def influence_scores(model, safety: Objective, params: Mapping[str, Tensor], task_grad: ParamVector,
                     precond) -> list[dict]:
    """Per safety example: ``∇L_task^T (H + λI)^{-1} ∇S_i`` (≈ how much a preconditioned safety step on example i
    would lower the task loss; higher is more compatible with the task)."""
    v = precond.apply(task_grad)
    scores = []
    with curvature_mode(model):
        for t_idx, term in enumerate(safety.terms):
            for b_idx, batch in enumerate(term.batches):
                sums, counts = next(batch_nll_sums(model, [batch], grad=True, per_example=True))
                for row in range(sums.shape[0]):
                    if int(counts[row]) == 0:
                        continue
                    grads = torch.autograd.grad(sums[row] / counts[row], list(params.values()), retain_graph=True,
                                                allow_unused=True)
                    g = {n: (x if x is not None else torch.zeros_like(p)) for (n, p), x in zip(params.items(), grads)}
                    scores.append({"term": term.name, "batch": b_idx, "row": row,
                                   "score": float(term.sign * term.weight * dot(g, v))})
    return scores


def select_examples(safety: Objective, scores: list[dict], top: int) -> Objective:
    """A safety objective on the ``top`` highest-scoring examples only (rows sliced out of their batches)."""
    from ..objectives import LossTerm

    keep = sorted(scores, key=lambda s: -s["score"])[:top]
    terms = []
    for term in safety.terms:
        rows: dict[int, list[int]] = {}
        for s in keep:
            if s["term"] == term.name:
                rows.setdefault(s["batch"], []).append(s["row"])
        batches = [{k: v[sorted(r)] for k, v in term.batches[b].items()} for b, r in sorted(rows.items())]
        if batches:
            terms.append(LossTerm(term.name, batches, term.weight, term.sign, term.ceiling))
    return Objective(terms)


def _norm(v: ParamVector) -> float:
    return float(dot(v, v)) ** 0.5


def _guarded_direction(precond, g: ParamVector, constraint_grads: Sequence[ParamVector]) -> ParamVector:
    """The preconditioned direction ``d`` of ``g`` (the step is ``-d``), less, for each constraint whose gradient
    the step would raise to first order, its component along that constraint's preconditioned gradient."""
    d = precond.apply(g)
    for gc in constraint_grads:
        rise = float(dot(gc, d))
        if rise < 0:
            pc = precond.apply(gc)
            d = {n: d[n] - (rise / max(float(dot(gc, pc)), 1e-30)) * pc[n] for n in d}
    return d


@dataclass
class _Trial:
    """A backtracking search along one direction: the accepted ``(step, radius, task, S, terms)`` or None,
    whether any trial lowered S, whether any fitted every budget, and the budgets broken by lowering trials."""

    accepted: Optional[tuple]
    descended: bool
    inside: bool
    broke: set


def _backtrack(model, chosen: dict, d: ParamVector, radius: float, s_cur: float, task: Objective,
               safety: Objective, budget: float, constraints: Sequence[Constraint], loss_tokens: Optional[int],
               tries: int = 8) -> _Trial:
    """Steps ``-r d / |d|`` with ``r = radius, radius / 2, ...``: the first that lowers S and keeps the task loss
    and every constraint within budget is accepted (the parameters hold it); else the parameters are restored.
    ``loss_tokens``: the losses' passes (:func:`~curvsafe.objectives.objective_values`)."""
    d_norm = max(_norm(d), 1e-30)
    base = _snapshot(chosen)
    r = radius
    descended, inside, broke = False, False, set()
    for _ in range(tries):
        step = {n: -(r / d_norm) * d[n] for n in d}
        _assign(chosen, {n: base[n] + step[n] for n in base})
        task_terms, terms_new, *levels = objective_values(model, [task, safety, *(c.objective for c in constraints)],
                                                          max_tokens=loss_tokens)
        l_new, s_new = sum(task_terms.values()), sum(terms_new.values())
        lowered = s_new < s_cur - 1e-6 * abs(s_cur)
        over = {"task loss"} if l_new > budget else set()
        over |= {c.name for c, level in zip(constraints, levels) if sum(level.values()) > c.budget}
        fits = not over
        descended, inside = descended or lowered, inside or fits
        if lowered:
            broke |= over
        if lowered and fits:
            return _Trial((step, r, l_new, s_new, terms_new), descended, inside, broke)
        r *= 0.5
    _assign(chosen, base)
    return _Trial(None, descended, inside, broke)


def restore(model, safety: Objective, task: Objective, *, method: str = RestoreConfig.method, params=None,
            task_budget: float = RestoreConfig.task_budget, task_budget_abs: float = RestoreConfig.task_budget_abs,
            iterations: int = RestoreConfig.iterations, damping: float = RestoreConfig.damping,
            curvature_seed: int = 0, select_top: Optional[int] = None,
            safety_target: Union[None, float, Mapping[str, float]] = None, trust_radius: float = 0.1,
            refresh_every: int = 1, max_mu_growth: int = 4, progress: bool = True,
            callback: Optional[Callable[[dict], None]] = None,
            constraints: Sequence[Constraint] = (), ggn_rows: Optional[int] = None,
            ggn_tokens: Optional[int] = None, loss_tokens: Optional[int] = None,
            low_rank: Optional[LowRank] = LowRank(), curvature_batches: Optional[int] = None) -> RestoreResult:
    """Edit ``params`` of ``model`` in place to lower ``safety`` within the task budget (module docstring).

    Args:
        method: ``kfac`` | ``ekfac`` | ``lbfgs`` | ``cg`` | ``sgd`` (see :mod:`.preconditioners`); the defaults
            of this and the other settings are :class:`~curvsafe.config.RestoreConfig`'s.
        params: parameter-name globs to edit (default: the trainable ones, i.e. the adapter).
        damping: relative damping of the task curvature.
        curvature_seed: ``kfac`` / ``ekfac``: the seed of the Monte Carlo labels of the task curvature.
        select_top: restore on the ``select_top`` safety examples with the highest influence scores only.
        safety_target: stop once S is at or below it (the aligned model's own value of S); a mapping
            ``{term name: value}`` stops once each named term is at or below its value (terms not named, such as
            the ``benign`` side of a two-sided anchor, shape the path but set no target).
        trust_radius: first trial step norm, relative to the norm of the edited parameters.
        callback: called with each accepted step's log entry (after the parameters hold the step).
        ggn_rows: ``lbfgs`` / ``cg``: run each GGN-vector product in passes of at most this many rows (the same
            product; their activation memory, about 3x a training step's, shrinks in proportion).
        ggn_tokens: ``lbfgs`` / ``cg``: merge consecutive task batches into passes of up to this many tokens
            (rows x longest length; the same product in fewer, larger forwards; None: one pass per batch).
        loss_tokens: the same for the values and gradients of the task loss, S and the constraints (each
            objective's batches merged into passes of up to this many tokens; every pass differentiated on its own,
            so a gradient holds one pass's activations; None: one pass per batch). Not on an FSDP2-sharded model.
        low_rank: ``kfac`` / ``ekfac``: the memory bound of the task curvature's factors (None: all dense).
        curvature_batches: fit the task curvature on at most this many of ``task``'s batches, evenly spaced
            (:func:`curvature_subset`); the task loss, its gradient and its budget use every batch (None: all).
        constraints: further quantities that every accepted step keeps within their budgets: the step loses its
            component that would raise one to first order (projected out in the curvature metric), and the
            task-descent term of J descends them too (``μ (L + Σ C)``).

    An exception after an accepted step does not lose the work: the parameters are set back to the last
    accepted state (the best: every accepted step lowers S inside the budget) and the result says ``error``.
    Before any accepted step the exception propagates, with the parameters as they were; so does an interrupt
    (KeyboardInterrupt), with the parameters at the last accepted state.

    Under ``torch.distributed`` (every rank calls ``restore`` with its own batches of each objective): values,
    gradients and curvature are those of the union of the ranks' data, so every rank takes the same steps; an
    exception always propagates (parameters at the last accepted state), since a failure on one rank leaves the
    others unable to go on; only rank 0 shows progress.
    """
    from tqdm.auto import tqdm

    if task_budget < 0 or task_budget_abs < 0:
        raise ValueError(f"task budgets must be >= 0, got {task_budget} and {task_budget_abs}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    start = time.perf_counter()
    chosen = trainable_params(model, params)
    if select_top is not None and any(is_sharded(p) for p in chosen.values()):
        raise ValueError("select_top (influence scores per example) does not run on an FSDP2-sharded model")
    precond = make_preconditioner(method, damping, ggn_rows, ggn_tokens=ggn_tokens, seed=curvature_seed,
                                  low_rank=low_rank)
    curvature = curvature_subset(task.batches, curvature_batches)
    theta0 = _snapshot(chosen)
    task_terms, terms0 = objective_values(model, [task, safety], max_tokens=loss_tokens)
    l0, s0 = sum(task_terms.values()), sum(terms0.values())
    if not (torch.isfinite(torch.tensor([l0, s0])).all()):
        raise FloatingPointError(f"non-finite losses at the start (task {l0}, safety {s0})")
    budget = budget_of(l0, task_budget, task_budget_abs)

    influence: list[dict] = []
    if select_top is not None:
        safety, influence = _influence_selection(model, safety, task, curvature, chosen, precond, select_top,
                                                 loss_tokens)
        if influence:
            terms0 = safety.term_values(model, max_tokens=loss_tokens)
            s0 = sum(terms0.values())

    norm0 = max(_norm(theta0), 1e-3)
    loop = _Loop(model, chosen, precond, task, curvature, safety, constraints, budget, (trust_radius * norm0,
                 4 * trust_radius * norm0), max_mu_growth, (s0, l0, terms0), theta0, loss_tokens)
    stopped, detail, error, binding = StopReason.ITERATIONS, "", None, ()
    bar = tqdm(range(iterations), desc=f"restore ({method})", disable=not progress or not is_main(), leave=False)
    try:
        for it in bar:
            if _reached(safety_target, loop.s_cur, loop.terms_cur):
                break
            outcome = loop.iterate(partial(_refresh_due, it, refresh_every, bool(influence)))
            if outcome is not None:
                stopped, detail, binding = outcome
                break
            bar.set_postfix(S=f"{loop.s_cur:.3f}", L=f"{loop.l_cur:.4f}")
            if callback is not None:
                callback(loop.log[-1])
    except Exception as exc:
        if not loop.log or is_distributed():  # ranks cannot agree on a rank's own failure: every rank stops
            _assign(chosen, loop.best)
            raise
        _assign(chosen, loop.best)
        stopped, error = StopReason.ERROR, f"{type(exc).__name__}: {exc}"
        detail = f"failed after {len(loop.log)} accepted steps ({error}); the last accepted state is kept"
    except BaseException:  # KeyboardInterrupt and the like: leave the model at its last accepted state
        _assign(chosen, loop.best)
        raise
    finally:
        bar.close()
    if stopped is not StopReason.ERROR and _reached(safety_target, loop.s_cur, loop.terms_cur):
        stopped = StopReason.TARGET
        detail = f"safety objective {loop.s_cur:.4f} at its target {_describe(safety_target)} (the aligned model's)"
    elif stopped is StopReason.ITERATIONS:
        detail = (f"{iterations} accepted steps, the cap; safety objective {loop.s_cur:.4f}"
                  + ("" if safety_target is None else f", target {_describe(safety_target)}"))
    return RestoreResult(method=method, safety_objective={"before": s0, "after": loop.s_cur, "target": safety_target},
                         task_nll={"before": l0, "after": loop.l_cur, "budget": budget}, steps=loop.log,
                         layer_update_norms=_layer_update_norms(_snapshot(chosen), theta0), influence=influence,
                         stopped=stopped, stop_detail=detail, error=error, binding=binding,
                         seconds=time.perf_counter() - start)


def _refresh_due(it: int, refresh_every: int, refreshed_on_safety: bool, first: bool) -> bool:
    """Whether to refresh the curvature before a direction of iteration ``it`` (``first``: its first direction):
    at the first of iteration 0 (unless ``select_top`` already refreshed it on the safety gradient), and before
    every direction of each ``refresh_every``-th iteration after it."""
    return (it == 0 and first and not refreshed_on_safety) or (it > 0 and it % refresh_every == 0)


def _reached(target: Union[None, float, Mapping[str, float]], s: float, terms: Mapping[str, float]) -> bool:
    """Whether S (a float target) or each named term (a mapping) is at or below its target."""
    if target is None:
        return False
    if not isinstance(target, Mapping):
        return s <= target
    return all(terms[name] <= value for name, value in target.items())


def _describe(target: Union[float, Mapping[str, float]]) -> str:
    if not isinstance(target, Mapping):
        return f"{target:.4f}"
    return ", ".join(f"{name} {value:.4f}" for name, value in target.items())


def curvature_subset(batches: Sequence, limit: Optional[int]) -> list:
    """At most ``limit`` of ``batches``, evenly spaced over them in order (``batches[floor(i * n / limit)]``), so
    a task file's later parts count as its first; all of them when ``limit`` is None or not below their number."""
    batches = list(batches)
    if limit is not None and limit < 1:
        raise ValueError(f"curvature_batches must be >= 1 or None, got {limit}")
    if limit is None or limit >= len(batches):
        return batches
    return [batches[(i * len(batches)) // limit] for i in range(limit)]


def _influence_selection(model, safety: Objective, task: Objective, curvature: list, chosen: dict, precond,
                         select_top: int, loss_tokens: Optional[int]) -> tuple[Objective, list[dict]]:
    """``select_top``: the safety objective on its top-scoring examples and every example's score, with the
    curvature refreshed on the safety gradient (``safety`` and no scores when that gradient is zero)."""
    (_, s_grad), (_, task_grad) = objective_gradients(model, chosen, [safety, task], max_tokens=loss_tokens)
    if _norm(s_grad) == 0:
        return safety, []
    precond.refresh(model, curvature, chosen, s_grad)
    influence = influence_scores(model, safety, chosen, task_grad, precond)
    return select_examples(safety, influence, select_top), influence


def _layer_update_norms(theta: ParamVector, theta0: ParamVector) -> dict[str, float]:
    """The norm of each module's edit (its parameters together)."""
    deltas: dict[str, float] = {}
    for n, p in theta.items():
        module = n.rsplit(".", 1)[0]
        deltas[module] = deltas.get(module, 0.0) + float((p - theta0[n]).square().sum())
    return {k: v ** 0.5 for k, v in deltas.items()}


class _Loop:
    """The state of the restore loop between iterations (levels, trust radius, task-descent weight μ and its
    growths, the last accepted parameters, the log) and one iteration: gradients, then steps along the
    preconditioned direction of ``S + μ (L + Σ C)``, μ changing (module docstring) until one is accepted or it has
    changed too often."""

    def __init__(self, model, chosen: dict, precond, task: Objective, curvature: list, safety: Objective,
                 constraints: Sequence[Constraint], budget: float, radii: tuple[float, float], max_mu_growth: int,
                 levels: tuple[float, float, dict], theta0: ParamVector, loss_tokens: Optional[int]):
        self.model, self.chosen, self.precond = model, chosen, precond
        self.task, self.safety, self.constraints, self.budget = task, safety, constraints, budget
        self.curvature = curvature  # the task batches the curvature is fitted on
        self.loss_tokens = loss_tokens  # the losses' passes (objective_values)
        (self.radius, self.max_radius), self.max_mu_growth = radii, max_mu_growth  # first and largest step
        self.s_cur, self.l_cur, self.terms_cur = levels
        self.mu, self.growths = 0.0, 0
        self.best = theta0
        self.log: list[dict] = []

    def iterate(self, refresh_due: Callable[[bool], bool]) -> Optional[tuple[StopReason, str, tuple]]:
        """One iteration; None after an accepted step (the parameters hold it), else why it stops
        ``(reason, detail, binding budgets)`` with the parameters as they were. ``refresh_due(first)``: whether
        to refresh the curvature before a direction (``first``: the iteration's first)."""
        model, chosen = self.model, self.chosen
        (_, gs), (_, gl), *constrained = objective_gradients(
            model, chosen, [self.safety, self.task, *(c.objective for c in self.constraints)],
            max_tokens=self.loss_tokens)
        gs_norm = _norm(gs)
        if gs_norm == 0.0:
            return StopReason.FLAT, ("the safety gradient is zero: every term is at its ceiling (the aligned "
                                     "model's NLL) or carries no signal here"), ()
        c_grads = [g for _, g in constrained]
        for gc in c_grads:
            gl = {n: gl[n] + gc[n] for n in gl}
        gl_norm = max(_norm(gl), 1e-30)
        accepted, descended, inside, broke = None, False, False, set()
        first = True
        while accepted is None:
            gj = {n: gs[n] + self.mu * gl[n] for n in gs}
            if refresh_due(first):
                self.precond.refresh(model, self.curvature, chosen, gj)
            first = False
            d = _guarded_direction(self.precond, gj, c_grads)
            trial = _backtrack(model, chosen, d, self.radius, self.s_cur, self.task, self.safety, self.budget,
                               self.constraints, self.loss_tokens)
            accepted = trial.accepted
            descended, inside, broke = descended or trial.descended, inside or trial.inside, broke | trial.broke
            if accepted is None:
                self.growths += 1
                if self.growths > self.max_mu_growth:
                    return self._failure(descended, inside, broke)
                if trial.broke or self.mu == 0.0:
                    self.mu = max(2 * self.mu, 0.5 * gs_norm / gl_norm)
                else:
                    self.mu = 0.0
        step, r, l_new, s_new, terms_new = accepted
        if r < self.radius / 3 and trial.broke:  # accepted only after backtracking: the budget binds
            self.mu = max(2 * self.mu, 0.5 * gs_norm / gl_norm)
        self.log.append({"iteration": len(self.log), "step_norm": _norm(step), "mu": self.mu,
                         "predicted": {"safety": float(dot(gs, step)),
                                       "task": float(dot(gl, step)) + 0.5 * self.precond.quad(step)},
                         "realised": {"safety": s_new - self.s_cur, "task": l_new - self.l_cur},
                         "safety_objective": s_new, "task_nll": l_new})
        self.best = _snapshot(chosen)
        self.s_cur, self.l_cur, self.terms_cur = s_new, l_new, terms_new
        self.radius = min(2.0 * r, self.max_radius)
        return None

    def _failure(self, descended: bool, inside: bool, broke: set) -> tuple[StopReason, str, tuple]:
        """Why no step was accepted: a budget bound every step that lowered S, or none lowered it."""
        if not descended:
            where = "" if inside else " or stayed inside the task budget"
            return StopReason.NO_DESCENT, (f"no trial step lowered the safety objective ({self.s_cur:.4f}) along "
                                           f"the preconditioned direction{where}"), ()
        bounds = {"task loss": (self.budget, self.l_cur),
                  **{c.name: (c.budget, c.objective.evaluate(self.model, max_tokens=self.loss_tokens))
                     for c in self.constraints}}
        detail = "every step that lowered the safety objective took " + " or ".join(
            f"the {name} past its budget {bounds[name][0]:.4f} (now {bounds[name][1]:.4f})"
            for name in bounds if name in broke)
        return StopReason.BUDGET, detail, tuple(sorted(broke))
