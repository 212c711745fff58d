"""``CurvSafe``: an optimizer wrapper that keeps every update from spending the model's safety.

Conventions (per captured linear block, weight seen as its (d_out, d_in) matrix, see :mod:`curvsafe.capture`):

- **Safety loss** ``S`` (see :mod:`curvsafe.objectives`): ``anchor`` (default) is the NLL of the model's own greedy
  responses to the harmful prompts of ``safety_batches``, recorded at construction (the aligned model's refusals;
  first ``prefix_tokens`` response tokens); ``refusal`` the NLL of the responses given in ``safety_batches``
  (first ``prefix_tokens`` tokens); ``harmful`` minus the NLL of the given (harmful) responses, flat once it is
  above its value at construction. Lower ``S`` is safer.
- **Safety curvature**: K-FAC factors ``A`` (d_in, d_in), ``G`` (d_out, d_out) of ``S``'s NLL data (empirical
  Fisher by default), fitted on the current parameters at each refresh and averaged over refreshes with
  ``ema_decay`` (``F = d * F_old + (1 - d) * F_new``), float32, eigendecomposed at each refresh.
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
- **Projection**: the wrapped optimizer's update ``U`` of a block becomes
  ``QG ((QG^T U QA) * scale) QA^T`` with ``scale_ij = 1 / (1 + strength * lam_G_i * lam_A_j / mean)``, where
  ``mean`` is the mean curvature eigenvalue over *all* protected parameters (``sum_blocks tr(A) tr(G)`` plus
  ``tr(G)`` per protected bias, divided by their number): directions whose safety curvature is high relative to
  the whole adapter are damped, flat ones pass, and blocks that carry little safety curvature are barely touched
  (a per-block mean damps every block's top directions alike: on the testbed's attack it kept 91% of AdamW's task
  accuracy, the global mean 97-99%). A bias (input 1) has the eigenvalues ``lam_G``. A block with no safety
  curvature (e.g. ``lora_A`` while ``lora_B`` is still 0) passes unchanged. ``strength=0`` turns the projection
  off. A factor above ``low_rank.max_dense_dim`` (LLM-sized blocks) is a truncated eigenbasis with an isotropic
  rest (:mod:`curvsafe.curvature.lowrank`): its left-out directions get the scale of the rest eigenvalue.
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
  ``alpha, beta >= 0`` (the two half-spaces' projection). Paying back harmful-side drift alone pushes toward
  refusing in general, and benign requests that look like harmful ones follow (measured on the realistic testbed:
  30% of held-out benign requests refused against the aligned model's 3%); the benign constraint makes the
  payback use directions that tell the two apart. Cost: one more gradient pass per refresh.
- Parameters of the wrapped optimizer outside the captured blocks are updated by it untouched. With
  ``strength=0`` and ``guard=False`` every step is the wrapped optimizer's, bit for bit.
- Under ``torch.distributed`` (DDP) the safety factors, token counts and the safety gradient are all-reduced over
  ranks (each rank passes its own shard of the safety data), so every rank applies the identical projection to the
  identical (already all-reduced) update.

On CUDA the projection runs the Triton ``kron_eigen_apply`` kernel, on CPU the C++ extension (or PyTorch); see
:mod:`curvsafe.kernels`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Iterable, Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from ..anchors import anchor_batches, keep_response_prefix
from ..capture import LinearBlock, ModuleSelection, find_blocks
from ..config import FisherType, parse_option
from ..curvature import KFAC
from ..curvature.kfac import factor_eigens
from ..curvature.distributed import all_reduce_counts, is_distributed
from ..curvature.lowrank import LowRank, SketchedFactor, truncated_kron_apply, truncated_vector_apply
from ..kernels import kron_eigen_apply
from ..nll import batch_nll_sums
from ..objectives import HARMFUL_SIDE, LossTerm, Objective, parse_objective
from ..objectives import safety_batches as as_safety_batches
from ..plan import gib, kfac_bytes

log = logging.getLogger(__name__)

STATE_VERSION = 5
_STACK_ENTRIES = 1 << 20  # blocks whose QA and QG hold at most this many entries are projected in stacked groups


def _working(t: Tensor) -> Tensor:
    """``t`` in the precision the constraint is computed in: float32, or float64 for float64 parameters."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (curvature passes must not trigger DDP's gradient synchronisation)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _refuse_sharded(model: nn.Module) -> None:
    """FSDP (1: a wrapper with flat parameters; 2: ``fully_shard``'s DTensor parameters) is refused up front: the
    curvature passes would run FSDP's all-gathers and gradient reduce-scatters into the training gradients, and the
    projection needs each block's whole update (see the README's FSDP paragraph)."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    sharded = isinstance(model, FullyShardedDataParallel) or any(isinstance(p, DTensor) for p in model.parameters())
    if sharded:
        raise ValueError("CurvSafe does not support FSDP-sharded models (FullyShardedDataParallel or fully_shard): "
                         "the projection needs each protected block's whole update and the safety passes must not "
                         "trigger FSDP's collectives; use DDP, or protect an unsharded model")


def _same_on_every_rank(value: int, what: str, device: torch.device) -> None:
    """Under ``torch.distributed``: every rank raises unless ``value`` is the same on all of them."""
    if not is_distributed():
        return
    extremes = torch.tensor([value, -value], dtype=torch.float64, device=device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    if extremes[0] != -extremes[1]:
        raise ValueError(f"every rank must pass the same number of {what} (from {int(-extremes[1])} to "
                         f"{int(extremes[0])} here), since each is measured over all ranks")


def _dot(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    return torch.stack([(x * y).sum() for x, y in zip(xs, ys)]).sum()


def _halfspace_multipliers(excess: Tensor, gram: Tensor) -> Optional[Tensor]:
    """Multipliers ``c >= 0`` of the smallest correction ``u - sum_i c_i g_i`` that brings ``<u, g_i> + r_i``
    (``excess``) to <= 0 for every constraint ``i`` (``gram``: the ``<g_i, g_j>``), for one or two constraints; None
    when every constraint already holds. Active sets are tried smallest first; a constraint with a zero gradient
    is dropped (nothing can move it)."""
    k = excess.numel()
    usable = [i for i in range(k) if gram[i, i] > 0]
    if not any(excess[i] > 0 for i in usable):
        return None
    candidates = [[i] for i in usable] + ([usable] if len(usable) == 2 else [])
    for active in candidates:
        if len(active) == 1:
            solved = excess[active] / gram[active[0], active[0]]
        else:
            try:
                solved = torch.linalg.solve(gram[active][:, active], excess[active])
            except RuntimeError:  # parallel gradients: the pair is singular, a single constraint decides
                continue
        if (solved < 0).any():
            continue
        coefs = torch.zeros_like(excess)
        coefs[active] = solved
        after = excess - gram @ coefs
        if all(after[i] <= 1e-6 * max(1.0, float(excess[i].abs())) for i in usable):
            return coefs
    first = usable[0]  # no active set satisfies both (conflicting constraints): the safety side wins
    coefs = torch.zeros_like(excess)
    coefs[first] = torch.clamp(excess[first] / gram[first, first], min=0)
    return coefs


def _saved(f):
    """A factor as plain tensors (a sketched one as its sketch and trace), loadable with ``weights_only``."""
    return f.state() if isinstance(f, SketchedFactor) else f


class CurvSafe(Optimizer):
    """Wrap ``optimizer`` so that each update is projected away from the safety curvature of ``model``.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over (some of) ``model``'s parameters (AdamW first).
        model: the model being fine-tuned (a PEFT model, a plain HF model or a DDP wrapper of one).
        safety_batches: the harmful prompts, as HF batches (``input_ids``, ``attention_mask``; ``labels`` with
            -100 on the prompt when there are responses: refusals for ``refusal``, harmful answers for
            ``harmful``; without ``labels`` the whole row is the prompt) or as a list of prompt strings with
            ``tokenizer``. ``anchor`` reads only the prompts. Under DDP each rank passes its own shard.
        objective: ``"anchor"``, ``"refusal"``, ``"harmful"`` or a sum such as ``"anchor+harmful"``.
        refresh_every: the most optimizer steps between refreshes of the safety curvature and gradient (the first
            step refreshes).
        refresh_tol: refresh earlier, once the protected parameters have moved by this fraction of their norm at
            the last refresh (None: every ``refresh_every`` steps).
        refresh_batches: safety batches fitted per refresh, taken in turn (None: all of them every refresh). Pass
            the safety data in several batches to spread its cost over refreshes.
        strength: how strongly high-curvature safety directions are damped (0: no projection).
        guard: remove the update's first-order push against safety.
        modules: the blocks to protect (see :func:`curvsafe.capture.find_blocks`; default: the LoRA modules when
            there are any, else every linear layer but ``lm_head``), restricted to those ``optimizer`` updates.
        ema_decay: weight of the previous factors at a refresh.
        fisher_type: K-FAC Fisher of the safety data (``"empirical"`` or ``"mc"``).
        prefix_tokens: response tokens counted by the ``anchor`` and ``refusal`` losses (None: all).
        max_new_tokens: length of the recorded anchor responses (default: ``prefix_tokens``, or 32 when all
            tokens count; tokens after the counted ones would not change the loss, only the cost).
        pad_id, eos_id: token ids for generating the anchor (default: ``model.config``'s).
        tokenizer: tokenises ``safety_batches`` when it is a list of prompt strings.
        restore_drift: with the guard, pay back the rise of the safety loss measured at each refresh (module
            docstring, **Guard**).
        drift_steps: over how many steps a measured rise is paid back.
        benign_batches: benign prompts (the shapes ``safety_batches`` takes) whose answers the guard keeps, so
            that protecting the refusals does not spread them to benign requests (module docstring, **Benign
            side**; needs ``guard``). Under DDP each rank passes its own shard, the same number of batches.
        low_rank: the memory bound of the safety factors (:class:`~curvsafe.curvature.lowrank.LowRank`; None:
            every factor dense).

    Behaves like the wrapped optimizer: ``param_groups``, ``state``, ``defaults`` and ``zero_grad`` are its own,
    so LR schedulers, gradient accumulation, AMP's ``GradScaler``, the HF ``Trainer`` and TRL's ``SFTTrainer``
    (``optimizers=(CurvSafe(...), scheduler)``, also with bf16 autocast) work unchanged; ``state_dict`` holds the
    wrapped optimizer's state and CurvSafe's (step count, refresh reference, anchor batches, factors, eigenbases,
    safety gradient), so a resumed run continues exactly.
    """

    def __init__(self, optimizer: Optimizer, model: nn.Module, safety_batches: Iterable[Mapping[str, Tensor]], *,
                 objective: Union[str, Mapping[str, float]] = "anchor", refresh_every: int = 50,
                 refresh_tol: Optional[float] = 0.1, refresh_batches: Optional[int] = 1, strength: float = 3.0,
                 guard: bool = True, modules: ModuleSelection = None,
                 ema_decay: float = 0.5, fisher_type: str = "empirical", prefix_tokens: Optional[int] = 4,
                 max_new_tokens: Optional[int] = None, pad_id: Optional[int] = None, eos_id=None, tokenizer=None,
                 restore_drift: bool = True, drift_steps: int = 2,
                 benign_batches: Optional[Iterable[Mapping[str, Tensor]]] = None,
                 low_rank: Optional[LowRank] = LowRank()):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, CurvSafe):
            raise TypeError("optimizer is already a CurvSafe")
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
        if refresh_tol is not None and not refresh_tol > 0:
            raise ValueError(f"refresh_tol must be > 0 or None, got {refresh_tol}")
        if refresh_batches is not None and refresh_batches < 1:
            raise ValueError(f"refresh_batches must be >= 1 or None, got {refresh_batches}")
        if strength < 0:
            raise ValueError(f"strength must be >= 0, got {strength}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if drift_steps < 1:
            raise ValueError(f"drift_steps must be >= 1, got {drift_steps}")
        fisher_type = parse_option(FisherType, fisher_type, "fisher_type",
                                   allowed=(FisherType.EMPIRICAL, FisherType.MC)).value
        weights = parse_objective(objective, allowed=HARMFUL_SIDE)
        batches = as_safety_batches(safety_batches, tokenizer, needs_responses=set(weights) != {"anchor"})
        if benign_batches is not None and not guard:
            raise ValueError("benign_batches are a guard constraint: pass guard=True (the default)")
        benign = None if benign_batches is None else as_safety_batches(benign_batches, tokenizer,
                                                                        needs_responses=False)
        self.optimizer = optimizer
        self.model = _unwrap(model)
        _refuse_sharded(self.model)
        self.refresh_every = int(refresh_every)
        self.refresh_tol = None if refresh_tol is None else float(refresh_tol)
        self.refresh_batches = None if refresh_batches is None else int(refresh_batches)
        self.strength = float(strength)
        self.guard = bool(guard)
        self.ema_decay = float(ema_decay)
        self._check_params_in_model()
        self.blocks = self._optimized_blocks(modules)
        self._params = self._captured_params()
        self.objective = weights
        config = getattr(self.model, "config", None)
        pad_id = pad_id if pad_id is not None else getattr(config, "pad_token_id", None)
        eos_id = eos_id if eos_id is not None else getattr(config, "eos_token_id", None)
        if max_new_tokens is None:
            max_new_tokens = prefix_tokens if prefix_tokens is not None else 32
        self.safety = self._build_safety(weights, batches, pad_id=pad_id if pad_id is not None else 0,
                                         eos_id=eos_id, prefix_tokens=prefix_tokens, max_new_tokens=max_new_tokens)
        if self.refresh_batches is not None:
            self._check_batches_stand_alone()
        self.restore_drift, self.drift_steps = bool(restore_drift), int(drift_steps)
        # S on each safety batch at construction (the level drift is measured against), what is still owed, and
        # the first-order decrease each step pays
        if self.restore_drift:
            _same_on_every_rank(self._batch_count(), "safety batches", next(self.model.parameters()).device)
        self._levels = [self._level(i) for i in range(self._batch_count())] if self.restore_drift else []
        self._owed, self._pay = 0.0, 0.0
        self.benign: Optional[LossTerm] = None  # the benign anchor, its gradient, levels and drift owed
        self._bgrad: dict[str, Tensor] = {}
        self._gram: Optional[Tensor] = None  # <g, g>, <g, b>, <b, b> of the two guard gradients
        self._benign_levels: list[float] = []
        self._bowed, self._bpay = 0.0, 0.0
        if benign is not None:
            if not hasattr(self.model, "generate"):
                raise ValueError(f"benign_batches record the model's own answers, but {type(self.model).__name__} "
                                 "has no .generate()")
            self.benign = LossTerm("benign", anchor_batches(self.model, benign, pad_id=pad_id if pad_id is not None
                                                            else 0, eos_id=eos_id, max_new_tokens=max_new_tokens,
                                                            prefix_tokens=prefix_tokens))
            if self.refresh_batches is not None:
                self._check_stand_alone(self.benign)
            if self.restore_drift:
                _same_on_every_rank(len(self.benign.batches), "benign batches",
                                    next(self.model.parameters()).device)
                self._benign_levels = [self._union_nll([b], empty=0.0) for b in self.benign.batches]
        self._kfac = KFAC(self.model, [b.name for b in self.blocks], fisher_type=fisher_type, progress=False,
                          low_rank=low_rank)
        held = kfac_bytes(self.model, low_rank, [b.name for b in self.blocks])
        log.info(f"CurvSafe: {len(self.blocks)} blocks, safety curvature about "
                 f"{gib(2 * held['factors'] + held['eigen'] + held['corrected'])} (factors, their EMA, eigenbases; "
                 f"{held['sketched']} factors truncated); see `curvsafe plan`")
        self._step = 0
        self._refreshes = 0
        self._last_refresh = 0
        self._reference: list[Tensor] = []  # the protected parameters at the last refresh
        self._factors: dict[str, tuple[Tensor, Tensor]] = {}
        self._eigen: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = {}  # QA, QG, weight scale, bias scale
        self._rests: dict[str, tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]] = {}  # truncated blocks
        self._damp = 0.0  # strength / mean eigenvalue (the truncated blocks' scales are computed from it)
        self._groups: list[tuple[list[LinearBlock], Tensor, Tensor, Tensor]] = []  # see _stacked_groups
        self._grad: dict[str, Tensor] = {}
        self._grad_sq: Optional[Tensor] = None
        self._before: list[Tensor] = []
        # what torch.optim.Optimizer.__init__ sets up for its hooks (its params live in the wrapped optimizer)
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    # ------------------------------------------------------------------ construction
    def _check_params_in_model(self) -> None:
        known = {id(p) for p in self.model.parameters()}
        foreign = [tuple(p.shape) for g in self.optimizer.param_groups for p in g["params"] if id(p) not in known]
        if foreign:
            raise ValueError(f"{len(foreign)} parameter(s) of the optimizer are not parameters of the model "
                             f"(shapes {foreign[:3]}{'...' if len(foreign) > 3 else ''}): pass the model the "
                             "optimizer trains")

    def _optimized_ids(self) -> set[int]:
        return {id(p) for g in self.optimizer.param_groups for p in g["params"]}

    def _optimized_blocks(self, modules: ModuleSelection) -> list[LinearBlock]:
        optimized = self._optimized_ids()
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

    def _build_safety(self, weights: dict[str, float], batches: list, *, pad_id: int, eos_id,
                      prefix_tokens: Optional[int], max_new_tokens: int) -> Objective:
        terms = []
        for name, w in weights.items():
            if name == "anchor":
                if not hasattr(self.model, "generate"):
                    raise ValueError(f"the anchor objective records the model's own responses, but "
                                     f"{type(self.model).__name__} has no .generate(); use objective='refusal'")
                terms.append(LossTerm("anchor", anchor_batches(self.model, batches, pad_id=pad_id, eos_id=eos_id,
                                                               max_new_tokens=max_new_tokens,
                                                               prefix_tokens=prefix_tokens), w))
            elif name == "refusal":
                terms.append(LossTerm("refusal", keep_response_prefix(batches, prefix_tokens), w))
            else:
                terms.append(LossTerm("harmful", batches, w, sign=-1.0, ceiling=self._union_nll(batches)))
        return Objective(terms)

    def _batch_count(self) -> int:
        return len(self.safety.terms[0].batches)

    def _level(self, index: Optional[int] = None) -> float:
        """S on the safety batches of position ``index`` in every term (all of them when None), over all ranks."""
        total = 0.0
        for t in self.safety.terms:
            batches = t.batches if index is None else [t.batches[index % len(t.batches)]]
            nll = self._union_nll(batches, empty=0.0)
            if t.sign < 0 and t.ceiling is not None:
                nll = min(nll, t.ceiling)
            total += t.weight * t.sign * nll
        return total

    def _measure_drift(self, indices: Optional[list[int]]) -> None:
        """Set what the guard owes: the rise of S on the batches at ``indices`` (all when None) since
        construction."""
        if indices is None:
            now, base = self._level(), sum(self._levels) / len(self._levels)
        else:
            now = sum(self._level(i) for i in indices) / len(indices)
            base = sum(self._levels[i] for i in indices) / len(indices)
        self._owed = max(0.0, now - base)
        self._pay = self._owed / self.drift_steps

    def _check_batches_stand_alone(self) -> None:
        """With ``refresh_batches`` a refresh may fit one batch alone: each must have response tokens."""
        for t in self.safety.terms:
            self._check_stand_alone(t)

    @staticmethod
    def _check_stand_alone(term: LossTerm) -> None:
        for i, b in enumerate(term.batches):
            try:
                LossTerm(term.name, [b])
            except ValueError:
                raise ValueError(f"safety batch {i} of the {term.name} data has no response tokens, but with "
                                 "refresh_batches a refresh fits batches on their own; regroup the data or "
                                 "pass refresh_batches=None") from None

    def _union_nll(self, batches: list, *, empty: Optional[float] = None) -> float:
        """Mean NLL of ``batches`` over all ranks (``empty`` when they count no token; None: an error)."""
        total, count = 0.0, 0
        with torch.no_grad():
            for s, n in batch_nll_sums(self.model, batches, grad=False):
                total, count = total + float(s), count + int(n)
        total, count = all_reduce_counts([total, count], next(self.model.parameters()).device)
        if count == 0:
            if empty is None:
                raise ValueError("the harmful safety data has no response tokens")
            return empty
        return total / count

    # ------------------------------------------------------------------ optimizer interface
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups):
        self.optimizer.param_groups = groups

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, state):
        self.optimizer.state = state

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults):
        self.optimizer.defaults = defaults

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the wrapped optimizer; its parameters must belong to the model. The protected blocks
        stay those chosen at construction (their biases join from the next refresh on)."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        known = {id(p) for p in self.model.parameters()}
        if any(id(p) not in known for p in params):
            raise ValueError("add_param_group: parameters that are not the model's cannot be added")
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def step_count(self) -> int:
        """Optimizer steps taken (steps skipped by a GradScaler do not count)."""
        return self._step

    @property
    def refresh_count(self) -> int:
        """Refreshes of the safety curvature and gradient so far."""
        return self._refreshes

    @property
    def active(self) -> bool:
        return self.strength > 0 or self.guard

    def step(self, closure: Optional[Callable[[], float]] = None):
        """The wrapped optimizer's step, then the safety projection and guard on the captured blocks."""
        if not self.active:
            loss = self.optimizer.step(closure)
            self._step += 1
            return loss
        if self._refresh_due():
            self.refresh()
        params = list(self._params.values())
        if len(self._before) != len(params):
            self._before = [torch.empty_like(p) for p in params]
        with torch.no_grad():
            torch._foreach_copy_(self._before, params)
        loss = self.optimizer.step(closure)
        with torch.no_grad():
            self._constrain(params)
        self._step += 1
        return loss

    # ------------------------------------------------------------------ safety statistics
    def _refresh_due(self) -> bool:
        """First step, ``refresh_every`` steps since the last refresh, or moved by more than ``refresh_tol``."""
        if not (self._eigen or self._grad) or self._step - self._last_refresh >= self.refresh_every:
            return True
        if self.refresh_tol is None:
            return False
        params = list(self._params.values())
        if len(params) != len(self._reference):
            return True
        with torch.no_grad():
            moved = torch.stack(torch._foreach_norm(torch._foreach_sub(params, self._reference))).square().sum()
            norm = torch.stack(torch._foreach_norm(self._reference)).square().sum()
        return bool(moved > self.refresh_tol ** 2 * norm)

    def refresh(self) -> None:
        """Recompute the safety curvature (EMA over refreshes) and the safety gradient at the current parameters.

        Called by :meth:`step` when due (see **Refresh** in the module docstring); call it yourself after changing
        parameters behind the optimizer's back (e.g. ``add_param_group``). Fits the next ``refresh_batches``
        safety batches."""
        current = self._captured_params()
        if current.keys() != self._params.keys():
            self._params, self._before = current, []
        indices = self._refresh_indices()
        objective = self._refresh_objective()
        by_product = self.guard and self.strength > 0 and self._gradient_from_kfac()
        if self.strength > 0:
            self._refresh_curvature(objective, gradient=by_product)
        if self.guard:
            if by_product:
                weight = objective.terms[0].weight
                grad = {n: weight * self._kfac.gradient[n] for n in self._params}
            else:
                _, grad = objective.gradient(self.model, self._params)
            self._grad = {n: g.to(_working(self._params[n]).dtype) for n, g in grad.items()}
            self._grad_sq = sum((g * g).sum() for g in self._grad.values())
            if self.restore_drift:
                self._measure_drift(indices)
            if self.benign is not None:
                self._refresh_benign(indices)
        with torch.no_grad():
            self._reference = [p.detach().clone() for p in self._params.values()]
        self._last_refresh = self._step
        self._refreshes += 1

    def _refresh_benign(self, indices: Optional[list[int]]) -> None:
        """The benign anchor's gradient on this refresh's benign batches, and the rise of its NLL there since
        construction (what the benign constraint pays back)."""
        batches = self.benign.batches
        chosen = batches if indices is None else [batches[i % len(batches)] for i in indices]
        value, grad = Objective([LossTerm("benign", chosen)]).gradient(self.model, self._params)
        self._bgrad = {n: g.to(_working(self._params[n]).dtype) for n, g in grad.items()}
        self._gram = self._guard_gram()
        if self.restore_drift:
            positions = range(len(batches)) if indices is None else [i % len(batches) for i in indices]
            base = sum(self._benign_levels[i] for i in positions) / len(positions)
            self._bowed = max(0.0, value - base)
            self._bpay = self._bowed / self.drift_steps

    def _guard_gram(self) -> Tensor:
        """The Gram matrix of the safety and benign gradients (computed once per refresh, not per step)."""
        grads = [list(self._grad.values()), [self._bgrad[n] for n in self._grad]]
        return torch.stack([torch.stack([_dot(a, b) for b in grads]) for a in grads])

    def _gradient_from_kfac(self) -> bool:
        """Whether the K-FAC pass yields the safety gradient: one term that lowers an NLL, empirical Fisher, no
        bias among the protected parameters."""
        (term, *rest) = self.safety.terms
        return (not rest and term.sign > 0 and self._kfac.fisher_type == "empirical"
                and set(self._params) <= {b.weight_name for b in self.blocks})

    def _refresh_indices(self) -> Optional[list[int]]:
        """Positions of this refresh's safety batches: the next ``refresh_batches`` in turn (None: all)."""
        if self.refresh_batches is None:
            return None
        n = self._batch_count()
        k = min(self.refresh_batches, n)
        return [(self._refreshes * k + j) % n for j in range(k)]

    def _refresh_objective(self) -> Objective:
        """The safety objective on this refresh's data: per term, the batches at :meth:`_refresh_indices` (all
        of them when ``refresh_batches`` is None)."""
        indices = self._refresh_indices()
        if indices is None:
            return self.safety
        return Objective([LossTerm(t.name, [t.batches[i % len(t.batches)] for i in indices], t.weight, t.sign,
                                   t.ceiling) for t in self.safety.terms])

    def _refresh_curvature(self, objective: Objective, gradient: bool) -> None:
        self._kfac.reset()
        fresh = self._kfac.fit(objective.batches, gradient=gradient).factors
        d = self.ema_decay
        for b in self.blocks:
            A, G = fresh[b.name].A, fresh[b.name].G
            if b.name in self._factors:
                old_A, old_G = self._factors[b.name]
                A, G = d * old_A + (1 - d) * A, d * old_G + (1 - d) * G
            self._factors[b.name] = (A, G)
        self._eigen = self._projections()
        self._groups = self._stacked_groups()

    def _factor_eigen(self) -> dict[str, tuple[Tensor, Tensor, Optional[Tensor], float, int]]:
        """``"{block}.{A|G}"`` -> ``(lam, Q, rest, trace, dim)``; ``rest`` None for a dense factor."""
        named = {f"{n}.{k}": f for n, (A, G) in self._factors.items() for k, f in (("A", A), ("G", G))}
        low = self._kfac.low_rank
        # float32: the damping only resolves eigenvalues near the mean (tiny ones pass with scale ~1)
        eigen = factor_eigens(named, low.rank if low is not None else None, dtype=torch.float32)
        return {key: (lam, Q, rest, float(lam.sum()) if rest is None else float(named[key].trace()), Q.shape[0])
                for key, (lam, Q, rest) in eigen.items()}

    def _projections(self) -> dict[str, tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Per block: ``QA``, ``QG`` and the damping scales (weight (d_out, d_in), bias (d_out,); for a truncated
        block those of the kept eigenpairs, its rests in ``self._rests``), normalised by the mean curvature
        eigenvalue over all protected parameters."""
        eigen = self._factor_eigen()
        total, count = 0.0, 0
        for b in self.blocks:
            (*_, tr_A, d_A), (*_, tr_G, d_G) = eigen[f"{b.name}.A"], eigen[f"{b.name}.G"]
            total, count = total + tr_G * tr_A, count + d_G * d_A
            if b.bias_name in self._params:
                total, count = total + tr_G, count + d_G
        mean = total / count
        self._damp = damp = self.strength / mean if mean > torch.finfo(torch.float32).tiny else 0.0
        out, self._rests = {}, {}
        for b in self.blocks:
            (lam_A, QA, rest_A, *_), (lam_G, QG, rest_G, *_) = eigen[f"{b.name}.A"], eigen[f"{b.name}.G"]
            out[b.name] = (QA, QG, 1.0 / (1.0 + damp * torch.outer(lam_G, lam_A)), 1.0 / (1.0 + damp * lam_G))
            if rest_A is not None or rest_G is not None:
                self._rests[b.name] = (lam_A, rest_A, lam_G, rest_G)
        return out

    def _stacked_groups(self) -> list[tuple[list[LinearBlock], Tensor, Tensor, Tensor]]:
        """The blocks as groups for one ``kron_eigen_apply`` call each: small blocks of equal shapes together with
        their ``QA``, ``QG``, ``scale`` stacked (many small LoRA blocks cost one batched GEMM chain, not one call
        each), a block with large bases alone and unstacked (no copy; the call overhead is negligible there)."""
        groups: dict[tuple, list[LinearBlock]] = {}
        for b in self.blocks:
            if b.name in self._rests:  # truncated: projected on its own in _constrain
                continue
            QA, QG, scale, _ = self._eigen[b.name]
            small = QA.numel() + QG.numel() <= _STACK_ENTRIES
            key = (tuple(scale.shape), QA.dtype, QA.device) if small else (b.name,)
            groups.setdefault(key, []).append(b)
        out = []
        for blocks in groups.values():
            e = [self._eigen[b.name][:3] for b in blocks]
            out.append((blocks, *(e[0] if len(e) == 1 else [torch.stack(t) for t in zip(*e)])))
        return out

    # ------------------------------------------------------------------ the constraint
    def _constrain(self, params: list[Tensor]) -> None:
        names = list(self._params)
        if self.strength == 0:  # guard only: touch the parameters only where it acts (bit-exact otherwise)
            deltas = torch._foreach_sub([_working(p) for p in params], [_working(b) for b in self._before])
            correction = self._guard_correction(names, deltas)
            if correction is not None:
                torch._foreach_sub_(params, [c.to(p.dtype) for c, p in zip(correction, params)])
            return
        deltas = dict(zip(names, torch._foreach_sub([_working(p) for p in params],
                                                    [_working(b) for b in self._before])))
        for blocks, QA, QG, scale in self._groups:
            Vs = [b.as_matrix(deltas[b.weight_name]) for b in blocks]
            out = ([kron_eigen_apply(Vs[0], QA, QG, scale)] if len(blocks) == 1
                   else kron_eigen_apply(torch.stack(Vs), QA, QG, scale).unbind(0))
            for b, V, new in zip(blocks, Vs, out):
                deltas[b.weight_name] = b.from_matrix(new.to(V.dtype))
        for name, (lam_A, rest_A, lam_G, rest_G) in self._rests.items():
            block = next(b for b in self.blocks if b.name == name)
            QA, QG, scale, _ = self._eigen[name]
            V = block.as_matrix(deltas[block.weight_name])
            new = truncated_kron_apply(V.float(), QA, lam_A, rest_A, QG, lam_G, rest_G, scale, self._rest_scale)
            deltas[block.weight_name] = block.from_matrix(new.to(V.dtype))
        for block in self.blocks:
            if block.bias_name in deltas:
                _, QG, _, bias_scale = self._eigen[block.name]
                b = deltas[block.bias_name]
                rest_G = self._rests.get(block.name, (None,) * 4)[3]
                rest = None if rest_G is None else self._rest_scale(rest_G).to(b.dtype)
                deltas[block.bias_name] = truncated_vector_apply(b, QG.to(b.dtype), bias_scale.to(b.dtype), rest)
        projected = [deltas[n] for n in names]
        if self.guard:
            correction = self._guard_correction(names, projected)
            if correction is not None:
                torch._foreach_sub_(projected, correction)
        torch._foreach_add_(projected, [_working(b) for b in self._before])
        for p, new in zip(params, projected):
            p.copy_(new)

    def _rest_scale(self, lam: Tensor) -> Tensor:
        """The projection's scale of curvature eigenvalue(s) ``lam`` (truncated blocks' left-out directions)."""
        return 1.0 / (1.0 + self._damp * lam)

    def _guard_correction(self, names: list[str], deltas: list[Tensor]) -> Optional[list[Tensor]]:
        """What to subtract from the update ``u`` so that it lowers the safety loss by at least ``r`` to first order
        (``r``: this step's share of the drift still owed) and, with a benign side, the benign anchor by ``r_B``;
        None when ``u`` already does."""
        if self._grad_sq is None:
            return None
        pay = min(self._owed, self._pay)
        self._owed -= pay  # paid by this step, by the update itself or by the correction below
        constraints = [(self._grad, pay)]  # (gradient by name, this step's payback)
        gram = self._grad_sq.reshape(1, 1)
        if self._bgrad:
            bpay = min(self._bowed, self._bpay)
            self._bowed -= bpay
            constraints.append((self._bgrad, bpay))
            gram = self._gram
        grads = [[g[n] for n in names] for g, _ in constraints]
        excess = torch.stack([_dot(deltas, g) + r for g, (_, r) in zip(grads, constraints)])
        coefs = _halfspace_multipliers(excess, gram)
        if coefs is None:
            return None
        return [sum(c * g[i] for c, g in zip(coefs, grads)) for i in range(len(names))]

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """The wrapped optimizer's state under ``"optimizer"`` and CurvSafe's under ``"curvsafe"``."""
        own = {"version": STATE_VERSION, "step": self._step, "objective": self.objective,
               "refresh_every": self.refresh_every, "refresh_tol": self.refresh_tol,
               "refresh_batches": self.refresh_batches,
               "last_refresh": self._last_refresh, "refreshes": self._refreshes, "reference": list(self._reference),
               "strength": self.strength, "guard": self.guard,
               "ema_decay": self.ema_decay, "modules": [b.name for b in self.blocks],
               "safety": [{"name": t.name, "weight": t.weight, "sign": t.sign, "ceiling": t.ceiling,
                           "batches": t.batches} for t in self.safety.terms],
               "factors": {n: {"A": _saved(A), "G": _saved(G)} for n, (A, G) in self._factors.items()},
               "eigen": {n: {"QA": QA, "QG": QG, "scale": s, "bias_scale": bs}
                         for n, (QA, QG, s, bs) in self._eigen.items()},
               "rests": {n: list(r) for n, r in self._rests.items()}, "damp": self._damp,
               "grad": dict(self._grad), "restore_drift": self.restore_drift, "drift_steps": self.drift_steps,
               "levels": list(self._levels), "owed": self._owed, "pay": self._pay,
               "benign": None if self.benign is None else {
                   "batches": self.benign.batches, "grad": dict(self._bgrad), "levels": list(self._benign_levels),
                   "owed": self._bowed, "pay": self._bpay}}
        return {"optimizer": self.optimizer.state_dict(), "curvsafe": own}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`; the anchor recorded by the saved run replaces this one's."""
        if "optimizer" not in state_dict or "curvsafe" not in state_dict:
            raise ValueError("not a CurvSafe state_dict (expected the keys 'optimizer' and 'curvsafe'); a plain "
                             "optimizer's state goes to the wrapped optimizer's own load_state_dict")
        own = state_dict["curvsafe"]
        if own.get("version") != STATE_VERSION:
            raise ValueError(f"CurvSafe state version {own.get('version')} is not {STATE_VERSION}")
        if own["modules"] != [b.name for b in self.blocks]:
            raise ValueError("the saved CurvSafe state protects different modules than this one")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        device = next(self.model.parameters()).device

        def to(t: Tensor) -> Tensor:
            return t.to(device)

        self._step = int(own["step"])
        self.objective, self.refresh_every = own["objective"], int(own["refresh_every"])
        self.refresh_tol, self._last_refresh = own["refresh_tol"], int(own["last_refresh"])
        self.refresh_batches = own["refresh_batches"]
        self._refreshes = int(own["refreshes"])
        self.strength, self.guard, self.ema_decay = float(own["strength"]), bool(own["guard"]), float(own["ema_decay"])
        self.safety = Objective([LossTerm(t["name"], t["batches"], t["weight"], t["sign"], t["ceiling"])
                                 for t in own["safety"]])
        def factor(f):
            return SketchedFactor.from_state(f, device) if isinstance(f, dict) else to(f)

        self._factors = {n: (factor(f["A"]), factor(f["G"])) for n, f in own["factors"].items()}
        self._eigen = {n: (to(e["QA"]), to(e["QG"]), to(e["scale"]), to(e["bias_scale"]))
                       for n, e in own["eigen"].items()}
        self._rests = {n: tuple(None if t is None else to(t) for t in r) for n, r in own["rests"].items()}
        self._damp = float(own["damp"])
        self._groups = self._stacked_groups() if self._eigen else []
        self._params, self._before = self._captured_params(), []
        self._reference = [to(t) for t in own["reference"]]
        self._grad = {n: to(g) for n, g in own["grad"].items()}
        self._grad_sq = sum((g * g).sum() for g in self._grad.values()) if self._grad else None
        self.restore_drift, self.drift_steps = bool(own["restore_drift"]), int(own["drift_steps"])
        self._levels, self._owed, self._pay = list(own["levels"]), float(own["owed"]), float(own["pay"])
        benign = own["benign"]
        self.benign = None if benign is None else LossTerm("benign", benign["batches"])
        self._bgrad = {} if benign is None else {n: to(g) for n, g in benign["grad"].items()}
        self._gram = self._guard_gram() if self._bgrad else None
        self._benign_levels = [] if benign is None else list(benign["levels"])
        self._bowed, self._bpay = (0.0, 0.0) if benign is None else (float(benign["owed"]), float(benign["pay"]))

    def __repr__(self) -> str:
        return (f"CurvSafe({type(self.optimizer).__name__}, objective={'+'.join(self.objective)}, "
                f"blocks={len(self.blocks)}, refresh_every={self.refresh_every}, refresh_tol={self.refresh_tol}, "
                f"strength={self.strength}, guard={self.guard}, benign={self.benign is not None}, step={self._step})")
