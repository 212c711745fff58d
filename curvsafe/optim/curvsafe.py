"""``CurvSafe``: an optimizer wrapper that keeps every update from spending the model's safety.

A thin wrapper in the manner of torch.optim's own: the wrapped optimizer takes its step, then the
:class:`~curvsafe.optim.constraint.SafetyConstraint` (whose module docstring states the safety loss, the curvature,
the refresh policy, the projection, the guard and the benign side) constrains the update of the protected blocks.
What an optimizer exposes (``param_groups``, ``state``, ``defaults``, ``zero_grad``) is the wrapped optimizer's;
step hooks registered on the wrapper run around the whole constrained step; the state dict is the wrapped
optimizer's with the constraint's under ``"curvsafe"``. Settings:
:class:`~curvsafe.optim.settings.CurvSafeSettings`. With ``strength=0`` and ``guard=False`` every step is the
wrapped optimizer's, bit for bit.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..capture import LinearBlock
from ..curvature.distributed import all_reduce_counts
from ..curvature.sharded import local
from .constraint import SafetyConstraint
from .settings import CurvSafeSettings

log = logging.getLogger(__name__)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (curvature passes must not trigger DDP's gradient synchronisation)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _refuse_fsdp1(model: nn.Module) -> None:
    """FSDP1 (``FullyShardedDataParallel``, flat parameters) is refused up front; FSDP2 (``fully_shard``) is
    supported (:mod:`curvsafe.curvature.sharded`)."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        raise ValueError("CurvSafe does not support FSDP1 (FullyShardedDataParallel, flat parameters): shard the "
                         "model with FSDP2 (torch.distributed.fsdp.fully_shard; accelerate's fsdp_version: 2) or "
                         "use DDP")


class CurvSafe(Optimizer):
    """Wrap ``optimizer`` so that each update is projected away from the safety curvature of ``model``.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over (some of) ``model``'s parameters (AdamW first).
        model: the model being fine-tuned (a PEFT model, a plain HF model or a DDP wrapper of one).
        safety_batches: the harmful prompts, as HF batches (``input_ids``, ``attention_mask``; ``labels`` with
            -100 on the prompt when there are responses: refusals for ``refusal``, harmful answers for
            ``harmful``; without ``labels`` the whole row is the prompt) or as a list of prompt strings with
            ``tokenizer``. ``anchor`` reads only the prompts. Under DDP each rank passes its own shard.
        settings: a :class:`~curvsafe.optim.settings.CurvSafeSettings` (default: its defaults); its fields may
            also be given as keywords (``strength=2.0``, ``objective="anchor+harmful"``, ...), which replace those
            of ``settings``.
        benign_batches: benign prompts (the shapes ``safety_batches`` takes) whose answers the guard keeps, so
            that protecting the refusals does not spread them to benign requests (:mod:`~curvsafe.optim.constraint`,
            **Benign side**; needs ``guard``). Under DDP each rank passes its own shard, the same number of batches.
        monitor_batches: harmful prompts held out from the constraint (the shapes ``safety_batches`` takes): never
            fitted nor guarded, only read at each refresh, so that :attr:`monitor_rise` (also in :attr:`report` and
            the trainers' logs as ``curvsafe_monitor``) says whether the protection carries over to prompts it was
            not given (:mod:`~curvsafe.optim.constraint`, **Monitor**). Under DDP each rank passes its own shard.
        tokenizer: tokenises ``safety_batches`` / ``benign_batches`` / ``monitor_batches`` when they are lists of
            prompt strings.
        pad_id, eos_id: token ids for generating the anchors (default: ``model.config``'s).

    Behaves like the wrapped optimizer: ``param_groups``, ``state``, ``defaults`` and ``zero_grad`` are its own,
    so LR schedulers, gradient accumulation, AMP's ``GradScaler``, the HF ``Trainer`` and TRL's ``SFTTrainer``
    (``optimizers=(CurvSafe(...), scheduler)``, also with bf16 autocast) work unchanged; ``state_dict`` is the
    wrapped optimizer's with CurvSafe's own (settings, step count, refresh reference, anchor batches, factors,
    eigenbases, guard gradients) under ``"curvsafe"``, so a resumed run continues exactly. Checkpointers that keep
    only ``state`` and ``param_groups`` (``torch.distributed.checkpoint``, accelerate's FSDP checkpoints) need
    CurvSafe's own state saved beside them: :meth:`safety_state_dict` per rank (the CurvSafe trainers do it).
    """

    def __init__(self, optimizer: Optimizer, model: nn.Module, safety_batches: Iterable[Mapping[str, Tensor]],
                 settings: Optional[CurvSafeSettings] = None, *,
                 benign_batches: Optional[Iterable[Mapping[str, Tensor]]] = None,
                 monitor_batches: Optional[Iterable[Mapping[str, Tensor]]] = None, tokenizer=None,
                 pad_id: Optional[int] = None, eos_id=None, **overrides):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, CurvSafe):
            raise TypeError("optimizer is already a CurvSafe")
        settings = CurvSafeSettings.from_settings(settings, overrides)
        self.optimizer = optimizer
        self.model = _unwrap(model)
        _refuse_fsdp1(self.model)
        self._check_params_in_model()
        self.constraint = SafetyConstraint(self.model, optimizer, safety_batches, settings,
                                           benign_batches=benign_batches, monitor_batches=monitor_batches,
                                           tokenizer=tokenizer, pad_id=pad_id, eos_id=eos_id)
        # what torch.optim.Optimizer.__init__ sets up for its hooks (its params live in the wrapped optimizer)
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    def _check_params_in_model(self) -> None:
        known = {id(p) for p in self.model.parameters()}
        foreign = [tuple(p.shape) for g in self.optimizer.param_groups for p in g["params"] if id(p) not in known]
        if foreign:
            raise ValueError(f"{len(foreign)} parameter(s) of the optimizer are not parameters of the model "
                             f"(shapes {foreign[:3]}{'...' if len(foreign) > 3 else ''}): pass the model the "
                             "optimizer trains")

    @property
    def settings(self) -> CurvSafeSettings:
        return self.constraint.settings

    @property
    def blocks(self) -> list[LinearBlock]:
        """The protected blocks."""
        return self.constraint.blocks

    def refresh(self) -> None:
        """Recompute the safety curvature and the guarded gradients now (:meth:`SafetyConstraint.refresh`): after
        changing parameters behind the optimizer's back (e.g. ``add_param_group``)."""
        self.constraint.refresh()

    def safety_level(self, index: Optional[int] = None) -> float:
        """The safety loss on the safety batches (:meth:`SafetyConstraint.safety_level`)."""
        return self.constraint.safety_level(index)

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
        self.constraint.discard_examples()

    @property
    def step_count(self) -> int:
        """Optimizer steps taken (steps skipped by a GradScaler do not count)."""
        return self.constraint.steps

    @property
    def report(self):
        """What the safety constraint did in the last step (a :class:`~curvsafe.optim.constraint.StepReport`:
        update energy, the share the projection kept, the guard's correction, refreshes, drift; None before one)."""
        return self.constraint.report

    @property
    def monitor_rise(self) -> Optional[float]:
        """The rise of the held-out monitor's anchor NLL over its value at construction, measured at the last
        refresh (None without ``monitor_batches`` or before the first refresh); ``constraint.measure_monitor()``
        reads it now."""
        return self.constraint.monitor_rise

    @property
    def refresh_count(self) -> int:
        """Refreshes of the safety curvature and gradient so far."""
        return self.constraint.refreshes

    def step(self, closure: Optional[Callable[[], float]] = None):
        """The wrapped optimizer's step, then the safety projection and guard on the captured blocks."""
        if self._initialising_state():
            return self.optimizer.step(closure)
        if not self.constraint.active:
            loss = self.optimizer.step(closure)
            self.constraint.steps += 1
            return loss
        self.constraint.begin()
        loss = self.optimizer.step(closure)
        self.constraint.finish()
        return loss

    def _initialising_state(self) -> bool:
        """Whether this step only creates the wrapped optimizer's state: no state yet, every learning rate 0 and
        every gradient zero, as ``torch.distributed.checkpoint`` calls ``step`` before loading or saving an
        optimizer (``_init_optim_state``). Such a step is the wrapped optimizer's alone (no refresh, no guard, not
        counted); a first step of a warm-up from learning rate 0 has gradients and is a step like any other."""
        if self.optimizer.state or any(float(g.get("lr", 1.0)) != 0.0 for g in self.param_groups):
            return False
        grads = [local(p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")  # every rank decides alike:
        return all_reduce_counts([sum(int(torch.count_nonzero(g)) for g in grads)], device)[0] == 0

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """The wrapped optimizer's ``state_dict`` (``state`` and ``param_groups``, the layout optimizer checkpointers
        expect) with CurvSafe's own state under ``"curvsafe"`` (:meth:`safety_state_dict`)."""
        return {**self.optimizer.state_dict(), "curvsafe": self.safety_state_dict()}

    def safety_state_dict(self) -> dict:
        """CurvSafe's own state (:meth:`SafetyConstraint.state_dict`): settings, step count, refresh reference,
        anchor batches (under ``torch.distributed``: this rank's shard, so each rank saves its own), factors,
        eigenbases, guard gradients and drift. Loadable with ``weights_only``."""
        return self.constraint.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`: the wrapped optimizer's part, and CurvSafe's settings, anchors and safety
        statistics when it holds them (they replace this one's).

        Checkpointers that keep only ``state`` and ``param_groups`` (``torch.distributed.checkpoint``'s
        ``get_optimizer_state_dict`` / ``set_optimizer_state_dict``, which accelerate's FSDP checkpoints use) drop
        ``"curvsafe"``: the wrapped optimizer's part is loaded, a warning says so, and CurvSafe's own state is
        :meth:`load_safety_state_dict`'s to restore (the CurvSafe trainers save it per rank beside the checkpoint).
        """
        if "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state_dict (expected the keys 'state' and 'param_groups'"
                             + (", written by an older CurvSafe" if "optimizer" in state_dict else "") + ")")
        own = state_dict.get("curvsafe")
        if own is not None:
            self.constraint.check_state(own)
        self.optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != "curvsafe"})
        if own is None:
            log.warning("the optimizer state holds no CurvSafe state (a checkpointer that keeps only 'state' and "
                        "'param_groups'): the wrapped optimizer's state is loaded, CurvSafe's anchors and safety "
                        "factors stay as constructed; restore them with load_safety_state_dict")
        else:
            self.load_safety_state_dict(own)

    def load_safety_state_dict(self, own: dict) -> None:
        """Restore a :meth:`safety_state_dict` (the wrapped optimizer's state is left as it is)."""
        self.constraint.load_state_dict(own)

    def __repr__(self) -> str:
        s, c = self.settings, self.constraint
        return (f"CurvSafe({type(self.optimizer).__name__}, objective={'+'.join(s.objective)}, "
                f"blocks={len(c.blocks)}, refresh_every={s.refresh_every}, refresh_tol={s.refresh_tol}, "
                f"strength={s.strength}, guard={s.guard}, benign={len(c.sides) > 1}, screen={s.screen}, "
                f"step={c.steps})")
