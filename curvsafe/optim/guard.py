"""CurvSafe's guard: the smallest correction of an update that keeps it from raising the guarded losses.

Conventions: a guarded loss ``L_i`` has the gradient ``g_i`` (by parameter, at the last refresh) and a payback
``r_i >= 0`` for this step (the part of its measured drift the step must undo). The update ``u`` (by parameter, in
the order of ``g_i``'s tensors) must satisfy ``<u, g_i> <= -r_i`` for every ``i``: it may not raise ``L_i`` to
first order, and lowers it by ``r_i``. The correction is ``sum_i c_i g_i`` with ``c >= 0`` the multipliers of the
projection of ``u`` onto the intersection of those half-spaces (one or two constraints: the safety loss, and the
benign anchor when there is one). Everything here is a pure function of its arguments; the drift bookkeeping is
:class:`GuardSide`'s. The k x k problem (k <= 2) is solved on the host: the Gram matrix is read there once per
refresh, the step's ``<u, g_i>`` once per step, where each of the solve's tests on device tensors would wait for
the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from ..objectives import LossTerm, Objective


@dataclass
class GuardSide:
    """One guarded loss: its data, its value per batch at construction (the level drift is measured against), its
    gradient at the last refresh (by parameter name), the drift still owed and the most each step pays back."""

    loss: Objective | LossTerm
    levels: list[float] = field(default_factory=list)
    grad: dict[str, Tensor] = field(default_factory=dict)
    owed: float = 0.0
    pay: float = 0.0

    def owe(self, rise: float, steps: int) -> None:
        """Owe ``rise`` (floored at 0), paid back over ``steps`` steps."""
        self.owed = max(0.0, rise)
        self.pay = self.owed / steps

    def take(self) -> float:
        """This step's payback (counted as paid: by the update itself or by the guard's correction)."""
        pay = min(self.owed, self.pay)
        self.owed -= pay
        return pay


def dot(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """``<x, y>`` over lists of tensors (the sum of the per-tensor sums)."""
    return torch.stack([p.sum() for p in torch._foreach_mul(xs, ys)]).sum()


def gram_matrix(grads: list[list[Tensor]]) -> Tensor:
    """The ``<g_i, g_j>`` of the guarded gradients (computed once per refresh, not per step), on the host; for one
    gradient its squared norm summed tensor by tensor."""
    if len(grads) == 1:
        return sum((g * g).sum() for g in grads[0]).reshape(1, 1).cpu()
    return torch.stack([torch.stack([dot(a, b) for b in grads]) for a in grads]).cpu()


def halfspace_multipliers(excess: Tensor, gram: Tensor) -> Optional[Tensor]:
    """Multipliers ``c >= 0`` of the smallest correction ``u - sum_i c_i g_i`` that brings ``<u, g_i> + r_i``
    (``excess``) to <= 0 for every constraint ``i`` (``gram``: the ``<g_i, g_j>``), for one or two constraints; None
    when every constraint already holds. Active sets are tried smallest first; a constraint with a zero gradient
    is dropped (nothing can move it); when no active set meets both (conflicting constraints) the first wins."""
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
    first = usable[0]
    coefs = torch.zeros_like(excess)
    coefs[first] = torch.clamp(excess[first] / gram[first, first], min=0)
    return coefs


def guard_correction(update: list[Tensor], grads: list[list[Tensor]], paybacks: list[float],
                     gram: Tensor) -> Optional[list[Tensor]]:
    """What to subtract from ``update`` so that ``<u, g_i> <= -r_i`` for every guarded gradient ``g_i`` (payback
    ``r_i``; ``gram``: :func:`gram_matrix`'s, on the host); None when ``update`` already satisfies all of them."""
    excess = torch.stack([dot(update, g) + r for g, r in zip(grads, paybacks)]).cpu()  # the step's one read
    coefs = halfspace_multipliers(excess, gram)
    if coefs is None:
        return None
    coefs = coefs.tolist()  # exact: each the tensors' own dtype's value
    correction = torch._foreach_mul(grads[0], coefs[0])
    for c, g in zip(coefs[1:], grads[1:]):
        torch._foreach_add_(correction, torch._foreach_mul(g, c))
    return correction
