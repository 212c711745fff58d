"""The safety constraint of :class:`~curvsafe.optim.CurvSafe`: what it does to each update of the wrapped optimizer.

:class:`SafetyConstraint` owns the safety losses (built by :func:`curvsafe.objectives.safety_objective`), the guarded
sides, the :class:`~curvsafe.optim.projector.SafetyProjector` (factors through ``KFAC(ema_decay=...)``, eigenbases,
scales), the refresh policy and the step bookkeeping; the guard's correction is the pure function
:func:`~curvsafe.optim.guard.guard_correction`. ``CurvSafe`` only delegates: :meth:`SafetyConstraint.begin` before
the wrapped optimizer's step, :meth:`SafetyConstraint.finish` after it.

Conventions (per captured linear block, weight seen as its (d_out, d_in) matrix, see :mod:`curvsafe.capture`):

- **Safety loss** ``S`` (see :mod:`curvsafe.objectives`): ``anchor`` (default) is the NLL of the model's own greedy
  responses to the harmful prompts of ``safety_batches``, recorded at construction (the aligned model's refusals;
  first ``prefix_tokens`` response tokens); ``refusal`` the NLL of the responses given in ``safety_batches``
  (first ``prefix_tokens`` tokens); ``harmful`` minus the NLL of the given (harmful) responses, flat once it is
  above its value at construction. Lower ``S`` is safer.
- **Safety curvature**: K-FAC factors ``A`` (d_in, d_in), ``G`` (d_out, d_out) of ``S``'s NLL data (empirical
  Fisher by default), fitted on the current parameters at each refresh and averaged over refreshes by the
  K-FAC's own EMA (``ema_decay``: ``F = d * F_old + (1 - d) * F_new``), float32, eigendecomposed at each refresh.
- **Refresh**: the curvature and the safety gradient are recomputed when the protected parameters have moved by
  more than ``refresh_tol`` relative to their norm at the last refresh (``|theta - theta_ref| > refresh_tol *
  |theta_ref|``, over all protected parameters), and at the latest every ``refresh_every`` steps (the first step
  refreshes). LoRA factors are products with the other LoRA matrix, so they change with its relative change:
  early in fine-tuning (``B`` growing from 0) this refreshes every few steps, later rarely. Measured on the
  testbed's attack (``benchmarks/optimizer.py``): the refusals flip within about ten steps, a fixed 50-step
  refresh does not protect at all, ``refresh_tol=0.1`` protects as well as refreshing every 5 steps with 23
  refreshes in 282 steps instead of 57. ``refresh_tol=None`` refreshes every ``refresh_every`` steps. Memory: two
  copies of the protected parameters (the step's start and the last refresh) besides factors and eigenbases.
  Each refresh fits the next ``refresh_batches`` safety batches in turn (default 1), so the safety data's cost is
  spread over refreshes while the EMA keeps all of it in the factors; the guard uses the gradient of the batches
  just fitted. On the testbed, 3 batches of 16 prompts fitted one per refresh protect as well as all 48 every
  refresh (0% harmful; 4 of 12: 1.7%). ``refresh_batches=None`` fits all of them every refresh (under DDP: the
  union of the ranks' shards).
- **Projection** (:class:`~curvsafe.optim.projector.SafetyProjector`, which states the formula): the wrapped
  optimizer's update of each block is damped along the directions of high safety curvature relative to the mean
  over *all* protected parameters (a per-block mean damps every block's top directions alike: on the testbed's
  attack it kept 91% of AdamW's task accuracy, the global mean 97-99%). ``strength=0`` turns it off.
- **Rescale** (``rescale``, off by default): the projected update ``Pu`` is scaled back toward the wrapped step's
  length, ``Pu <- min(rescale, max(1, |u| / |Pu|)) Pu`` (norms over all protected parameters), before the guard.
  The projection chooses the direction; the wrapped optimizer's learning rate keeps setting the step's length, so
  the task's progress is not slowed by the energy the projection removed (on the testbed's attack it removes about
  half of it). Also faster along whatever the projection lets through: with harmful examples in the data and no
  screening the harmful rate rose (README, **The guarded recipe**), so it goes with ``screen``.
- **Guard** (``guard=True``): with ``g`` the gradient of ``S`` at the last refresh over all captured parameters,
  the applied update ``u`` satisfies ``<u, g> <= -r`` (it may not raise ``S`` to first order): a component along
  ``g`` is removed, ``u <- u - ((<u, g> + r) / |g|^2) g`` when ``<u, g> + r > 0``. ``r`` pays back drift: the
  first-order guard holds each step, yet ``S`` creeps up over many steps (second order, and the gradient goes
  stale between refreshes; measured on the testbed's attack: the anchor NLL rose 0.53 -> 0.72 over 282 steps
  with every step's ``<u, g> = 0``, and 11-36% of held-out harmful prompts were answered on seeds 0-2). So each
  refresh measures the rise of ``S`` on the batches it fits over their value at construction, and the next steps
  lower ``S`` by ``r = rise / drift_steps`` each (first order) until the rise is paid back
  (``restore_drift=False``: ``r = 0``).
- **Benign side** (``benign_batches``, optional): benign prompts whose answers must not turn into refusals. Their
  anchor ``B`` (the NLL of the model's own greedy answers at construction, first ``prefix_tokens`` tokens) is a
  second guard constraint with its own gradient ``b`` (refreshed with ``g``) and drift payback ``r_B``: the update
  satisfies ``<u, g> <= -r`` and ``<u, b> <= -r_B``, by the smallest change ``u - alpha g - beta b`` with
  ``alpha, beta >= 0`` (the two half-spaces' projection, :func:`~curvsafe.optim.guard.guard_correction`). Paying
  back harmful-side drift alone pushes toward refusing in general, and benign requests that look like harmful
  ones follow (measured on the realistic testbed: 30% of held-out benign requests refused against the aligned
  model's 3%); the benign constraint makes the payback use directions that tell the two apart. Cost: one more
  gradient pass per refresh.
- **Screening** (``screen``, off by default): before the wrapped optimizer's step, the training examples whose
  gradient on the protected blocks points against the guard's safety gradient (cosine above ``screen``) leave the
  gradient (:mod:`~curvsafe.optim.screen`, which states the convention and its cost); for fine-tuning data with
  harmful examples mixed in.
- **Monitor** (``monitor_batches``, optional): harmful prompts the constraint never fits nor guards, only reads.
  Their anchor ``M`` (the model's own greedy responses at construction, first ``prefix_tokens`` tokens, as the
  safety anchor) is measured at each refresh: :attr:`SafetyConstraint.monitor_rise` is ``M`` now minus ``M`` at
  construction (mean NLL over all monitor batches and ranks, eval mode). The guard pays back the rise it measures on
  the batches it fits, so that rise stays near 0 whether or not the protection carries over to prompts it has not
  seen; the monitor's rise is the held-out reading (on the default testbed's seed 3 the guard's own rise stayed
  under 0.003 nats while held-out prompts' anchor NLL rose 0.14-0.17 and 13-16% of them were answered: README).
  It changes no update. Cost: one no-grad forward over the monitor batches per refresh.
- Settings: :class:`~curvsafe.optim.settings.CurvSafeSettings` (one validated dataclass, saved in the state).
- **Report**: after each step :attr:`SafetyConstraint.report` (:class:`StepReport`) says what was done: the
  wrapped optimizer's update energy ``|u|^2``, the energy the projection kept, the guard's correction, the
  refresh before the step and its time, the drift paid and still owed, the examples screened, and after a refresh
  the projection's summary of the safety curvature (:attr:`SafetyProjector.spectrum`) and the monitor's rise
  (``benchmarks/optimizer.py --trace``).
- Parameters of the wrapped optimizer outside the captured blocks are updated by it untouched. With
  ``strength=0`` and ``guard=False`` every step is the wrapped optimizer's, bit for bit.
- Under ``torch.distributed`` (DDP) the safety factors, token counts and the safety gradient are all-reduced over
  ranks (each rank passes its own shard of the safety data), so every rank applies the identical projection to the
  identical (already all-reduced) update. Under FSDP2 (``fully_shard``) the same, on whole updates gathered from
  the ranks' shards; each rank keeps its part (:mod:`curvsafe.curvature.sharded`; FSDP1 is refused).

On CUDA the projection runs the Triton ``kron_eigen_apply`` kernel, on CPU the C++ extension (or PyTorch); see
:mod:`curvsafe.kernels`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from ..anchors import anchor_batches, keep_response_prefix
from ..capture import LinearBlock, find_blocks
from ..curvature.distributed import all_reduce_counts, is_distributed
from ..curvature.loss import curvature_mode
from ..curvature.sharded import gather_whole, is_sharded, local, local_part
from ..nll import batch_nll_sums
from ..objectives import LossTerm, Objective, safety_objective
from ..objectives import safety_batches as as_safety_batches
from ..plan import gib, kfac_bytes
from .guard import GuardSide, gram_matrix, guard_correction
from .projector import SafetyProjector
from .screen import ExampleScreen
from .settings import CurvSafeSettings

log = logging.getLogger(__name__)

STATE_VERSION = 10
# loadable older versions: the settings they ran with that they do not name, a nested dict completing a saved one
# (7: before rescale; 8: before the monitor; 9: before the warm-started truncated eigenbases, so every dense factor
# had a full eigh; all of them gave sketched factors the energy-weighted rest)
_BEFORE_10 = {"subspace": None, "low_rank": {"mean_rest": False}}
OLDER_STATES = {7: {"rescale": 1.0, **_BEFORE_10}, 8: _BEFORE_10, 9: _BEFORE_10}


def _as_they_ran(saved: Mapping, older: Mapping) -> dict:
    """A saved state's settings completed by what its version ran with and did not name (``OLDER_STATES``): a
    nested dict completes the saved one of that name (a saved None stays None)."""
    out = {**older, **saved}
    for name, fields in older.items():
        if isinstance(fields, Mapping) and isinstance(saved.get(name), Mapping):
            out[name] = {**fields, **saved[name]}
    return out


def _working(t: Tensor) -> Tensor:
    """``t`` in the precision the constraint is computed in: float32, or float64 for float64 parameters."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _energy(tensors: list[Tensor]) -> Tensor:
    """``sum_i |t_i|^2`` (a tensor: reading it is the only synchronisation)."""
    return torch.stack(torch._foreach_norm(tensors)).square().sum()


@dataclass
class StepReport:
    """What the constraint did to one optimizer step: ``SafetyConstraint.report`` after each step, for logs and
    diagnosis (``benchmarks/optimizer.py --trace``). Energies are squared norms summed over the protected
    parameters, kept as tensors until :meth:`as_dict` reads them."""

    step: int  # the step's index (0-based)
    refresh_seconds: Optional[float]  # the refresh before this step took this long (None: no refresh)
    update_sq: Tensor  # |u|^2: the wrapped optimizer's update
    projected_sq: Tensor  # |P u|^2 after the projection (|u|^2 without one)
    correction_sq: Tensor  # |c|^2: the guard's correction (0 where it did not act)
    paid: list[float]  # drift paid back by this step, per guarded side (safety first, then benign)
    owed: list[float]  # drift still owed after it, per side
    screened: Optional[tuple[int, int]] = None  # with screening: (examples screened, examples) over all ranks
    monitor: Optional[float] = None  # with a monitor, after a refresh: its rise (SafetyConstraint.monitor_rise)
    # after a refresh: computes the projection's curvature summary (SafetyProjector.spectrum) when it is read
    spectrum_of: Optional[Callable[[], dict]] = field(default=None, repr=False)

    @property
    def spectrum(self) -> Optional[dict]:
        """After a refresh (with a projection): the summary of the safety curvature it fitted
        (:attr:`SafetyProjector.spectrum`, computed on first reading); else None."""
        return None if self.spectrum_of is None else dict(self.spectrum_of())

    def as_dict(self) -> dict:
        """Plain numbers, with ``kept`` (``|P u|^2 / |u|^2``: the share of the update's energy the projection
        keeps) and ``guard`` (``|c|^2 / |u|^2``: the share the guard's correction takes)."""
        u, p, c = float(self.update_sq), float(self.projected_sq), float(self.correction_sq)
        return {"step": self.step, "refresh_seconds": self.refresh_seconds, "update_sq": u, "projected_sq": p,
                "correction_sq": c, "kept": p / u if u > 0 else 1.0, "guard": c / u if u > 0 else 0.0,
                "paid": list(self.paid), "owed": list(self.owed), "spectrum": self.spectrum,
                "screened": None if self.screened is None else list(self.screened), "monitor": self.monitor}


def _same_on_every_rank(value: int, what: str, device: torch.device) -> None:
    """Under ``torch.distributed``: every rank raises unless ``value`` is the same on all of them."""
    if not is_distributed():
        return
    extremes = torch.tensor([value, -value], dtype=torch.float64, device=device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    if extremes[0] != -extremes[1]:
        raise ValueError(f"every rank must pass the same number of {what} (from {int(-extremes[1])} to "
                         f"{int(extremes[0])} here), since each is measured over all ranks")


def _check_stand_alone(term: LossTerm) -> None:
    """With ``refresh_batches`` a refresh may fit one batch alone: each must have response tokens."""
    for i, b in enumerate(term.batches):
        try:
            LossTerm(term.name, [b])
        except ValueError:
            raise ValueError(f"safety batch {i} of the {term.name} data has no response tokens, but with "
                             "refresh_batches a refresh fits batches on their own; regroup the data or "
                             "pass refresh_batches=None") from None


class SafetyConstraint:
    """The safety state of a fine-tune and its constraint on the updates of ``optimizer``'s protected parameters.

    Args:
        model: the model being fine-tuned (unwrapped: not a DDP wrapper).
        optimizer: the wrapped optimizer; the protected blocks are those whose weight it updates.
        safety_batches, benign_batches, monitor_batches, tokenizer: as :class:`~curvsafe.optim.CurvSafe` takes
            them.
        settings: the validated settings.
        pad_id, eos_id: token ids for generating the anchors (default: ``model.config``'s).
    """

    def __init__(self, model: nn.Module, optimizer: Optimizer, safety_batches: Iterable[Mapping[str, Tensor]],
                 settings: CurvSafeSettings, *, benign_batches: Optional[Iterable[Mapping[str, Tensor]]] = None,
                 monitor_batches: Optional[Iterable[Mapping[str, Tensor]]] = None, tokenizer=None,
                 pad_id: Optional[int] = None, eos_id=None):
        self.settings = s = settings
        batches = as_safety_batches(safety_batches, tokenizer, needs_responses=set(s.objective) != {"anchor"})
        if benign_batches is not None and not s.guard:
            raise ValueError("benign_batches are a guard constraint: pass guard=True (the default)")
        benign, monitor = (None if b is None else as_safety_batches(b, tokenizer, needs_responses=False)
                           for b in (benign_batches, monitor_batches))
        self.model, self.optimizer = model, optimizer
        self.blocks = self._optimized_blocks()
        self.params = self._captured_params()  # the protected parameters by name
        config = getattr(model, "config", None)
        pad_id = pad_id if pad_id is not None else getattr(config, "pad_token_id", None)
        eos_id = eos_id if eos_id is not None else getattr(config, "eos_token_id", None)
        self._generation = {"pad_id": pad_id if pad_id is not None else 0, "eos_id": eos_id,
                            "max_new_tokens": s.anchor_tokens, "prefix_tokens": None}
        device = next(model.parameters()).device
        if any(is_sharded(p) for p in self.params.values()):  # FSDP2: every forward all-gathers, so every rank
            for data, what in ((batches, "safety batches"), (benign or [], "benign batches"),  # runs as many
                               (monitor or [], "monitor batches")):
                _same_on_every_rank(len(data), f"{what} (FSDP2: each forward all-gathers)", device)
        self.safety = safety_objective(s.objective, anchor=lambda: self._anchor(batches, "anchor"),
                                       responses=lambda: batches, prefix_tokens=s.prefix_tokens,
                                       ceiling=self._union_nll)
        if s.refresh_batches is not None:
            for t in self.safety.terms:
                _check_stand_alone(t)
        # the guarded losses: the safety loss S, then the benign anchor when given (module docstring, **Guard**)
        self.sides = [GuardSide(self.safety)]
        if s.restore_drift:
            _same_on_every_rank(self._batch_count(), "safety batches", device)
            self.sides[0].levels = [self.safety_level(i) for i in range(self._batch_count())]
        if benign is not None:
            term = LossTerm("benign", keep_response_prefix(self._anchor(benign, "benign"), s.prefix_tokens))
            if s.refresh_batches is not None:
                _check_stand_alone(term)
            side = GuardSide(term)
            if s.restore_drift:
                _same_on_every_rank(len(term.batches), "benign batches", device)
                side.levels = [self._union_nll([b], empty=0.0) for b in term.batches]
            self.sides.append(side)
        self.monitor: Optional[LossTerm] = None  # the held-out anchor (module docstring, **Monitor**)
        self._monitor_level = 0.0  # its NLL at construction
        self.monitor_rise: Optional[float] = None  # its rise at the last refresh (None before one)
        if monitor is not None:
            self.monitor = LossTerm("monitor", keep_response_prefix(self._anchor(monitor, "monitor"),
                                                                     s.prefix_tokens))
            self._monitor_level = self._union_nll(self.monitor.batches)
        self.projector = self._new_projector()
        self.screen: Optional[ExampleScreen] = None
        self._set_screen()
        held = kfac_bytes(model, s.low_rank, [b.name for b in self.blocks], subspace=s.subspace)
        log.info(f"CurvSafe: {len(self.blocks)} blocks, safety curvature about "
                 f"{gib(held['factors'] + held['eigen'] + held['corrected'])} (factors, eigenbases; "
                 f"{held['sketched']} factors sketched); see `curvsafe plan`")
        self.steps = 0  # optimizer steps taken
        self.refreshes = 0
        self._last_refresh = 0
        self._reference: list[Tensor] = []  # the protected parameters at the last refresh
        self._before: list[Tensor] = []  # the protected parameters at the start of the step
        self.gram: Optional[Tensor] = None  # <g_i, g_j> of the guarded gradients (None before the first refresh)
        self.report: Optional[StepReport] = None  # what the last step's constraint did
        self._refresh_seconds: Optional[float] = None  # of this step's refresh (None: none)
        self._paid: list[float] = []  # this step's paybacks
        self._since: Optional[Tensor] = None  # [|u|^2, |Pu|^2, |c|^2, steps] summed since the last summary()
        self._refreshes_then = 0  # refreshes at the last summary()
        self._screened: Optional[tuple[int, int]] = None  # this step's screening (screened, examples)
        self._screened_since = [0, 0]  # summed since the last summary()
        self._warned_mismatch = False

    # ------------------------------------------------------------------ construction
    def _new_projector(self) -> SafetyProjector:
        s = self.settings
        return SafetyProjector(self.model, self.blocks, strength=s.strength, ema_decay=s.ema_decay,
                               fisher_type=s.fisher_type, low_rank=s.low_rank, subspace=s.subspace)

    def _set_screen(self) -> None:
        """The example screen of the settings (hooks on the protected blocks), or none."""
        if self.screen is not None:
            self.screen.remove()
            self.screen = None
        if self.settings.screen is not None:
            self.screen = ExampleScreen(self.model, self.blocks, self.settings.screen)

    def discard_examples(self) -> None:
        """Forget the examples captured for screening (the gradients were zeroed without a step)."""
        if self.screen is not None:
            self.screen.clear()

    def _optimized_ids(self) -> set[int]:
        return {id(p) for g in self.optimizer.param_groups for p in g["params"]}

    def _optimized_blocks(self) -> list[LinearBlock]:
        optimized = self._optimized_ids()
        modules = self.settings.modules
        blocks = [b for b in find_blocks(self.model, modules) if id(b.module.weight) in optimized]
        if not blocks:
            raise ValueError(f"none of the selected modules ({modules!r}) has its weight in the optimizer: there "
                             "is nothing for CurvSafe to protect")
        return blocks

    def _captured_params(self) -> dict[str, Tensor]:
        """Weights (and optimized biases) of the captured blocks, by full name."""
        optimized = self._optimized_ids()
        named = dict(self.model.named_parameters())
        return {n: named[n] for b in self.blocks for n in b.param_names if id(named[n]) in optimized}

    def _anchor(self, batches: list, side: str) -> list:
        """The model's own greedy responses to the prompts of ``batches`` (all response tokens labelled)."""
        if not hasattr(self.model, "generate"):
            what = "the anchor objective" if side == "anchor" else f"{side}_batches"
            advice = "; use objective='refusal'" if side == "anchor" else ""
            raise ValueError(f"{what} record(s) the model's own responses, but {type(self.model).__name__} has no "
                             f".generate(){advice}")
        return anchor_batches(self.model, batches, **self._generation)

    def _batch_count(self) -> int:
        return len(self.safety.terms[0].batches)

    def safety_level(self, index: Optional[int] = None) -> float:
        """S on the safety batches of position ``index`` in every term (all of them when None), over all ranks."""
        total = 0.0
        for t in self.safety.terms:
            batches = t.batches if index is None else [t.batches[index % len(t.batches)]]
            nll = self._union_nll(batches, empty=0.0)
            if t.sign < 0 and t.ceiling is not None:
                nll = min(nll, t.ceiling)
            total += t.weight * t.sign * nll
        return total

    def _union_nll(self, batches: list, *, empty: Optional[float] = None) -> float:
        """Mean NLL of ``batches`` over all ranks (``empty`` when they count no token; None: an error), in
        curvature mode like every safety pass: eval mode, so that LoRA dropout does not read as drift."""
        total, count = 0.0, 0
        with torch.no_grad(), curvature_mode(self.model):
            for s, n in batch_nll_sums(self.model, batches, grad=False):
                total, count = total + float(s), count + int(n)
        total, count = all_reduce_counts([total, count], next(self.model.parameters()).device)
        if count == 0:
            if empty is None:
                raise ValueError("the harmful safety data has no response tokens")
            return empty
        return total / count

    # ------------------------------------------------------------------ a step
    @property
    def active(self) -> bool:
        """Whether the constraint changes updates at all (a projection or a guard)."""
        return self.settings.strength > 0 or self.settings.guard

    def begin(self) -> None:
        """Before the wrapped optimizer's step: adopt replaced parameters, refresh when due, remember the
        protected parameters (the update is measured from them)."""
        self._follow_replaced_params()
        self._refresh_seconds = self._paid = None
        if self._refresh_due():
            start = time.perf_counter()
            self.refresh()
            self._refresh_seconds = time.perf_counter() - start
        self._screened = None
        if self.screen is not None:
            self._screened = self.screen.apply(self.params, self.sides[0].grad)
            if self.screen.mismatch and not self._warned_mismatch:
                log.warning("CurvSafe screen: the examples captured since the last step do not add up to the "
                            "gradient (a skipped step, or gradients changed per parameter): this step is not "
                            "screened")
                self._warned_mismatch = True
            self._screened_since = [a + b for a, b in zip(self._screened_since, self._screened)]
        params = list(self.params.values())
        with torch.no_grad():
            if any(is_sharded(p) for p in params):  # FSDP2: this rank's shards
                self._before = [p.to_local().clone() for p in params]
            else:
                if len(self._before) != len(params):
                    self._before = [torch.empty_like(p) for p in params]
                torch._foreach_copy_(self._before, params)

    def finish(self) -> None:
        """After the wrapped optimizer's step: project and guard the update it made, count the step."""
        params = list(self.params.values())
        with torch.no_grad():
            if any(is_sharded(p) for p in params):
                self._constrain_sharded(params)
            else:
                self._constrain(params)
        self.steps += 1

    def _follow_replaced_params(self) -> None:
        """Adopt the model's parameters when they were replaced since construction (``fully_shard`` after the
        optimizer was built, as accelerate and the HF Trainer do: the captured tensors would be orphans). The
        curvature and gradients are kept (values by parameter name); the refresh reference is taken anew."""
        # read from the blocks' modules, which fully_shard keeps (a walk over the model's parameters took ~1 ms
        # per step on the testbed's model)
        owners = [(b.module, attr, name) for b in self.blocks
                  for attr, name in (("weight", b.weight_name), ("bias", b.bias_name)) if name in self.params]
        if any(getattr(module, attr) is not self.params[name] for module, attr, name in owners):
            self.params, self._before, self._reference = self._captured_params(), [], []

    # ------------------------------------------------------------------ refreshes
    def _refresh_due(self) -> bool:
        """First step, ``refresh_every`` steps since the last refresh, or moved by more than ``refresh_tol``."""
        s = self.settings
        if not (self.projector.fitted or self.sides[0].grad) or self.steps - self._last_refresh >= s.refresh_every:
            return True
        if s.refresh_tol is None:
            return False
        params = [local(p) for p in self.params.values()]  # FSDP2: this rank's shards, the sums all-reduced
        if len(params) != len(self._reference):
            return True
        with torch.no_grad():
            moved, norm = _energy(torch._foreach_sub(params, self._reference)), _energy(self._reference)
            if any(is_sharded(p) for p in self.params.values()):
                moved, norm = all_reduce_counts([float(moved), float(norm)], moved.device)
        return bool(moved > s.refresh_tol ** 2 * norm)

    def refresh(self) -> None:
        """Recompute the safety curvature (EMA over refreshes) and the guarded gradients at the current parameters.

        Called by :meth:`begin` when due (see **Refresh** in the module docstring); call it yourself after changing
        parameters behind the optimizer's back (e.g. ``add_param_group``). Fits the next ``refresh_batches``
        safety batches."""
        s = self.settings
        current = self._captured_params()
        if current.keys() != self.params.keys():
            self.params, self._before = current, []
        indices = self._refresh_indices()
        objective = self._refresh_objective(indices)
        by_product = s.guard and s.strength > 0 and self._gradient_from_kfac()
        if s.strength > 0:
            kfac_grad = self.projector.refit(objective.batches, self.params, gradient=by_product)
        if s.guard:
            safety = self.sides[0]
            if by_product:
                weight = objective.terms[0].weight
                grad = {n: weight * kfac_grad[n] for n in self.params}
            else:
                _, grad = objective.gradient(self.model, self.params)
            safety.grad = {n: g.to(_working(self.params[n]).dtype) for n, g in grad.items()}
            if s.restore_drift:
                positions = range(self._batch_count()) if indices is None else indices
                if by_product and len(positions) == 1:  # the K-FAC pass measured S on this one batch
                    now = objective.terms[0].weight * self.projector.kfac.mean_loss
                elif indices is None:
                    now = self.safety_level()
                else:
                    now = sum(self.safety_level(i) for i in indices) / len(indices)
                safety.owe(now - sum(safety.levels[i] for i in positions) / len(positions), s.drift_steps)
            for side in self.sides[1:]:
                self._refresh_side(side, indices)
            self.gram = gram_matrix([[side.grad[n] for n in safety.grad] for side in self.sides])
        with torch.no_grad():
            self._reference = [local(p).detach().clone() for p in self.params.values()]
        if self.monitor is not None:
            self.monitor_rise = self.measure_monitor()
        self._last_refresh = self.steps
        self.refreshes += 1

    def measure_monitor(self) -> float:
        """The monitor's rise now: its anchor NLL minus that at construction, over all ranks (module docstring,
        **Monitor**; every rank must call it). :meth:`refresh` measures it into :attr:`monitor_rise`; call this at
        the end of a run for a reading at the final parameters."""
        if self.monitor is None:
            raise ValueError("this CurvSafe has no monitor: pass monitor_batches (held-out harmful prompts)")
        return self._union_nll(self.monitor.batches) - self._monitor_level

    def _refresh_side(self, side: GuardSide, indices: Optional[list[int]]) -> None:
        """A further guarded loss's gradient on this refresh's batches, and the rise of its NLL there since
        construction (what its constraint pays back)."""
        batches = side.loss.batches
        positions = range(len(batches)) if indices is None else [i % len(batches) for i in indices]
        value, grad = Objective([LossTerm(side.loss.name, [batches[i] for i in positions])]).gradient(
            self.model, self.params)
        side.grad = {n: g.to(_working(self.params[n]).dtype) for n, g in grad.items()}
        if self.settings.restore_drift:
            side.owe(value - sum(side.levels[i] for i in positions) / len(positions), self.settings.drift_steps)

    def _gradient_from_kfac(self) -> bool:
        """Whether the K-FAC pass yields the safety gradient: one term that lowers an NLL, empirical Fisher, no
        bias among the protected parameters."""
        (term, *rest) = self.safety.terms
        return (not rest and term.sign > 0 and self.settings.fisher_type == "empirical"
                and set(self.params) <= {b.weight_name for b in self.blocks})

    def _refresh_indices(self) -> Optional[list[int]]:
        """Positions of this refresh's safety batches: the next ``refresh_batches`` in turn (None: all)."""
        if self.settings.refresh_batches is None:
            return None
        n = self._batch_count()
        k = min(self.settings.refresh_batches, n)
        return [(self.refreshes * k + j) % n for j in range(k)]

    def _refresh_objective(self, indices: Optional[list[int]]) -> Objective:
        """The safety objective on this refresh's data: per term, the batches at ``indices`` (all when None)."""
        if indices is None:
            return self.safety
        return Objective([LossTerm(t.name, [t.batches[i % len(t.batches)] for i in indices], t.weight, t.sign,
                                   t.ceiling) for t in self.safety.terms])

    # ------------------------------------------------------------------ the constraint
    def _constrain(self, params: list[Tensor]) -> None:
        names = list(self.params)
        deltas = torch._foreach_sub([_working(p) for p in params], [_working(b) for b in self._before])
        if self.settings.strength == 0:  # guard only: touch the parameters only where it acts (bit-exact otherwise)
            correction = self._guard_correction(names, deltas)
            self._record(_energy(deltas), None, correction)
            if correction is not None:
                torch._foreach_sub_(params, [c.to(p.dtype) for c, p in zip(correction, params)])
            return
        projected = self._projected(names, deltas)
        torch._foreach_add_(projected, [_working(b) for b in self._before])
        torch._foreach_copy_(params, projected)

    def _projected(self, names: list[str], update: list[Tensor]) -> list[Tensor]:
        """``update`` (whole tensors, in ``names``' order) projected, then guarded when the guard is on."""
        by_name = dict(zip(names, update))
        self.projector.project(by_name)
        projected = [by_name[n] for n in names]
        update_sq, projected_sq = _energy(update), _energy(projected)
        if self.settings.rescale > 1.0:  # back toward the wrapped step's length: sqrt(|u|^2 / |Pu|^2), capped
            scale = (update_sq / projected_sq.clamp_min(torch.finfo(projected_sq.dtype).tiny)).sqrt()
            torch._foreach_mul_(projected, scale.clamp(1.0, self.settings.rescale))
        correction = self._guard_correction(names, projected) if self.settings.guard else None
        self._record(update_sq, projected_sq, correction)
        if correction is not None:
            torch._foreach_sub_(projected, correction)
        return projected

    def _constrain_sharded(self, params: list[Tensor]) -> None:
        """:meth:`_constrain` for FSDP2 shards: the ranks' local updates are gathered into whole ones (one
        all-gather), projected and guarded alike on every rank, and each rank adds its part to its shards."""
        names = list(self.params)
        local_updates = [_working(p.to_local()) - _working(b) for p, b in zip(params, self._before)]
        update = gather_whole(params, local_updates)
        if self.settings.strength == 0:  # guard only: leave the wrapped step where the guard does not act
            correction = self._guard_correction(names, update)
            self._record(_energy(update), None, correction)
            if correction is None:
                return
            torch._foreach_sub_(update, correction)
        else:
            update = self._projected(names, update)
        for p, before, u in zip(params, self._before, update):
            p.to_local().copy_(_working(before) + local_part(p, u))

    def _guard_correction(self, names: list[str], update: list[Tensor]) -> Optional[list[Tensor]]:
        """The guard's correction of ``update`` for this step (each side pays its share of the drift it owes)."""
        if self.gram is None:
            return None
        self._paid = paybacks = [side.take() for side in self.sides]
        return guard_correction(update, [[side.grad[n] for n in names] for side in self.sides], paybacks, self.gram)

    def _record(self, update_sq: Tensor, projected_sq: Optional[Tensor],
                correction: Optional[list[Tensor]]) -> None:
        """This step's :class:`StepReport` from the wrapped update's energy ``update_sq`` and the projection's output
        energy ``projected_sq``, before any rescaling and the guard's correction (None: no projection)."""
        self.report = r = StepReport(
            self.steps, self._refresh_seconds, update_sq, update_sq if projected_sq is None else projected_sq,
            torch.zeros_like(update_sq) if correction is None else _energy(correction),
            self._paid or [0.0] * len(self.sides), [side.owed for side in self.sides], self._screened,
            self.monitor_rise if self._refresh_seconds is not None else None,
            self.projector.spectrum_of_this_refit() if self._refresh_seconds is not None and self.settings.strength > 0
            else None)
        energies = torch.stack([r.update_sq, r.projected_sq, r.correction_sq, torch.ones_like(r.update_sq)])
        self._since = energies if self._since is None else self._since + energies

    def summary(self) -> dict[str, float]:
        """Since the last call (which it resets): ``steps`` constrained, the share of their updates' energy the
        projection ``kept`` and the guard's correction took (``guard``), energy-weighted, and the ``refreshes``;
        with a projection, also the latest refresh's ``damped`` share of directions and ``effective_rank`` of the
        safety curvature (:attr:`SafetyProjector.spectrum`); with screening the share of examples ``screened``;
        with a monitor its latest ``monitor`` rise (:attr:`monitor_rise`). What the CurvSafe trainers add to the
        Trainer's logs; {} when no step was constrained."""
        if self._since is None:
            return {}
        update, projected, correction, steps = self._since.tolist()
        out = {"steps": int(steps), "kept": projected / update if update > 0 else 1.0,
               "guard": correction / update if update > 0 else 0.0, "refreshes": self.refreshes - self._refreshes_then}
        if self.settings.strength > 0 and self.projector.spectrum:
            out.update({k: self.projector.spectrum[k] for k in ("damped", "effective_rank")})
        if self.screen is not None:
            screened, examples = self._screened_since
            out["screened"] = screened / examples if examples else 0.0
        if self.monitor_rise is not None:
            out["monitor"] = self.monitor_rise
        self._since, self._refreshes_then, self._screened_since = None, self.refreshes, [0, 0]
        return out

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """CurvSafe's own state: settings, step count, refresh reference, anchor batches (under
        ``torch.distributed``: this rank's shard, so each rank saves its own), factors, eigenbases, guard gradients
        and drift. Loadable with ``weights_only``."""
        return {"version": STATE_VERSION, "settings": self.settings.to_dict(),
                "blocks": [b.name for b in self.blocks], "step": self.steps, "last_refresh": self._last_refresh,
                "refreshes": self.refreshes, "reference": list(self._reference),
                "safety": [{"name": t.name, "weight": t.weight, "sign": t.sign, "ceiling": t.ceiling,
                            "batches": t.batches} for t in self.safety.terms],
                "benign": self.sides[1].loss.batches if len(self.sides) > 1 else None,
                "monitor": None if self.monitor is None else {"batches": self.monitor.batches,
                                                              "level": self._monitor_level, "rise": self.monitor_rise},
                "sides": [{"grad": dict(side.grad), "levels": list(side.levels), "owed": side.owed, "pay": side.pay}
                          for side in self.sides],
                "projector": self.projector.state_dict()}

    def check_state(self, own: dict) -> None:
        """Raise unless ``own`` is a state of this version (or a loadable older one) protecting the same blocks."""
        if own.get("version") != STATE_VERSION and own.get("version") not in OLDER_STATES:
            raise ValueError(f"CurvSafe state version {own.get('version')} is not {STATE_VERSION} (nor one of the "
                             f"older versions it loads: {sorted(OLDER_STATES)})")
        if own["blocks"] != [b.name for b in self.blocks]:
            raise ValueError("the saved CurvSafe state protects different modules than this one")

    def load_state_dict(self, own: dict) -> None:
        """Restore a :meth:`state_dict` (the wrapped optimizer's state is left as it is)."""
        self.check_state(own)
        device = next(self.model.parameters()).device

        def to(t: Tensor) -> Tensor:
            return t.to(device)

        self.settings = CurvSafeSettings(**_as_they_ran(own["settings"], OLDER_STATES.get(own["version"], {})))
        self.steps, self._last_refresh = int(own["step"]), int(own["last_refresh"])
        self.refreshes = int(own["refreshes"])
        self.safety = Objective([LossTerm(t["name"], t["batches"], t["weight"], t["sign"], t["ceiling"])
                                 for t in own["safety"]])
        self.sides = [GuardSide(self.safety)] + ([] if own["benign"] is None else
                                                 [GuardSide(LossTerm("benign", own["benign"]))])
        monitor = own.get("monitor")  # version 8 states have none
        self.monitor = None if monitor is None else LossTerm("monitor", monitor["batches"])
        self._monitor_level = 0.0 if monitor is None else float(monitor["level"])
        self.monitor_rise = None if monitor is None or monitor["rise"] is None else float(monitor["rise"])
        for side, saved in zip(self.sides, own["sides"]):
            side.grad = {n: to(g) for n, g in saved["grad"].items()}
            side.levels, side.owed, side.pay = list(saved["levels"]), float(saved["owed"]), float(saved["pay"])
        self.projector = self._new_projector()
        self.projector.load_state_dict(own["projector"], device)
        self._set_screen()
        self.params, self._before = self._captured_params(), []
        self._reference = [to(t) for t in own["reference"]]
        grads = [[side.grad[n] for n in self.sides[0].grad] for side in self.sides]
        self.gram = gram_matrix(grads) if self.sides[0].grad else None
