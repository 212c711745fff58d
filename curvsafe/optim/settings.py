"""The settings of :class:`~curvsafe.optim.CurvSafe`: one validated dataclass used by its constructor, its
``state_dict`` and ``load_state_dict`` (kronfluence's ``FactorArguments`` style: a help text per field)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Union

from ..capture import ModuleSelection
from ..config import FisherType, Settings, parse_option, setting
from ..curvature.lowrank import LowRank
from ..curvature.subspace import SubspaceEigen
from ..objectives import HARMFUL_SIDE, parse_objective


@dataclass
class CurvSafeSettings(Settings):
    """How :class:`~curvsafe.optim.CurvSafe` protects safety (see its module docstring for each mechanism).

    ``CurvSafe(opt, model, safety, settings)`` or ``CurvSafe(opt, model, safety, strength=2.0, ...)`` (fields as
    keywords, replacing those of ``settings``). Validated on construction: ``objective`` becomes its weights by
    term, ``low_rank`` and ``subspace`` may be given as the dicts of a saved state.
    """

    objective: Union[str, Mapping[str, float]] = setting(
        '"anchor" (the model\'s own responses to the safety prompts at construction), "refusal", "harmful" or a '
        'weighted sum such as "anchor+harmful"', default="anchor")
    refresh_every: int = setting("the most optimizer steps between refreshes of the safety curvature and gradient "
                                 "(the first step refreshes)", default=50)
    refresh_tol: Optional[float] = setting("refresh earlier, once the protected parameters have moved by this "
                                           "fraction of their norm at the last refresh (None: every refresh_every "
                                           "steps)", default=0.1)
    refresh_batches: Optional[int] = setting("safety batches fitted per refresh, taken in turn (None: all of them "
                                             "every refresh)", default=1)
    strength: float = setting("how strongly high-curvature safety directions are damped (0: no projection)",
                              default=3.0)
    rescale: float = setting("scale the projected update back toward the wrapped optimizer's step length, by at "
                             "most this factor (1: the projection only removes; the direction is the projection's); "
                             "with screen, 2 kept more of the task on the testbeds", default=1.0)
    guard: bool = setting("remove the update's first-order push against safety (and against the benign side)",
                          default=True)
    screen: Optional[float] = setting("leave out of each step the training examples whose gradient on the protected "
                                      "blocks points against the safety gradient with a cosine above this "
                                      "(curvsafe.optim.screen; needs guard; None: off)", default=None)
    modules: ModuleSelection = setting("the blocks to protect (curvsafe.capture.find_blocks; default: the LoRA "
                                       "modules when there are any, else every linear layer but lm_head), restricted "
                                       "to those the optimizer updates", default=None)
    ema_decay: float = setting("weight of the previous safety factors at a refresh", default=0.5)
    fisher_type: str = setting('K-FAC Fisher of the safety data: "empirical" or "mc"', default="empirical")
    prefix_tokens: Optional[int] = setting("response tokens counted by the anchor, benign and refusal losses "
                                           "(None: all)", default=4)
    max_new_tokens: Optional[int] = setting("length of the recorded anchor responses (None: prefix_tokens, or 32 "
                                            "when all tokens count)", default=None)
    restore_drift: bool = setting("with the guard: pay back the rise of the safety loss measured at each refresh",
                                  default=True)
    drift_steps: int = setting("over how many steps a measured rise is paid back", default=2)
    low_rank: Optional[LowRank] = setting("the memory bound of the safety factors (None: every factor dense); the "
                                          "sketched factors' rest is the mean of their left-out eigenvalues unless "
                                          "its mean_rest is False", default=LowRank())
    subspace: Optional[SubspaceEigen] = setting("dense safety factors of at least subspace.min_dim are decomposed "
                                                "to their top subspace.rank eigenpairs by subspace iteration from "
                                                "the last refresh's basis, the rest as one eigenvalue "
                                                "(curvsafe.curvature.subspace; None: a full eigh of each at every "
                                                "refresh)", default=SubspaceEigen())

    def __post_init__(self):
        if self.refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {self.refresh_every}")
        if self.refresh_tol is not None and not self.refresh_tol > 0:
            raise ValueError(f"refresh_tol must be > 0 or None, got {self.refresh_tol}")
        if self.refresh_batches is not None and self.refresh_batches < 1:
            raise ValueError(f"refresh_batches must be >= 1 or None, got {self.refresh_batches}")
        if self.strength < 0:
            raise ValueError(f"strength must be >= 0, got {self.strength}")
        if not self.rescale >= 1.0:
            raise ValueError(f"rescale must be >= 1 (1: no rescaling), got {self.rescale}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.screen is not None and not 0.0 <= self.screen < 1.0:
            raise ValueError(f"screen must be a cosine in [0, 1) or None, got {self.screen}")
        if self.screen is not None and not self.guard:
            raise ValueError("screen compares each example's gradient with the guard's safety gradient: pass "
                             "guard=True (the default)")
        if self.drift_steps < 1:
            raise ValueError(f"drift_steps must be >= 1, got {self.drift_steps}")
        for name in ("prefix_tokens", "max_new_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        self.fisher_type = parse_option(FisherType, self.fisher_type, "fisher_type",
                                        allowed=(FisherType.EMPIRICAL, FisherType.MC)).value
        self.objective = parse_objective(self.objective, allowed=HARMFUL_SIDE)
        if isinstance(self.low_rank, Mapping):
            self.low_rank = LowRank(**self.low_rank)
        if isinstance(self.subspace, Mapping):
            self.subspace = SubspaceEigen(**self.subspace)

    @property
    def anchor_tokens(self) -> int:
        """How many tokens the recorded anchor responses have (``max_new_tokens`` or its default)."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return self.prefix_tokens if self.prefix_tokens is not None else 32
