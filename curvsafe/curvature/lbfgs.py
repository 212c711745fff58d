"""L-BFGS inverse-Hessian operator (the paper's curvature): two-loop recursion over (s, y) pairs.

Convention: each pair satisfies ``y ≈ H s``. Pairs come from Hessian-vector products (``y = hvp(s)``,
:meth:`LBFGSInverse.from_hvp`) or from gradient differences along an optimisation path (:meth:`update`). Pairs with
``s.y <= min_curvature * |s||y|`` are skipped (they would break positive definiteness). ``inverse_mv(v, damping)``
applies the L-BFGS approximation of ``(H + damping I)^{-1}`` built from the pairs ``(s, y + damping s)``. The
initial matrix ``H0 = gamma I`` is, with ``initial="secant"`` (default), the classic ``gamma = s.y / y.y`` of the
newest pair (the overall scale, for optimisation); with ``initial="damping"`` and ``damping > 0``,
``gamma = 1 / damping``: directions the pairs never explored are treated as flat (curvature 0, damped), which is
what a damped inverse ``(H + damping I)^{-1}`` means there. ``mv`` applies the matching forward approximation
``B ≈ H + damping I`` in compact form (Byrd, Nocedal and Schnabel, 1994), so both directions satisfy the secant
equation of the newest pair exactly.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor

from .base import CurvatureOperator
from .vectors import ParamVector, flatten, unflatten


class LBFGSInverse(CurvatureOperator):
    """Limited-memory BFGS curvature over the parameters in ``param_shapes`` (float64 internally)."""

    def __init__(self, param_shapes: Mapping[str, torch.Size], *, history: int = 20, min_curvature: float = 1e-10,
                 initial: str = "secant"):
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        if initial not in ("secant", "damping"):
            raise ValueError(f"initial must be 'secant' or 'damping', got {initial!r}")
        self.initial = initial
        self.param_shapes = {n: torch.Size(s) for n, s in param_shapes.items()}
        self.history = history
        self.min_curvature = min_curvature
        self._pairs: deque[tuple[Tensor, Tensor]] = deque(maxlen=history)
        self.skipped = 0

    @property
    def num_pairs(self) -> int:
        return len(self._pairs)

    def update(self, s: Mapping[str, Tensor], y: Mapping[str, Tensor]) -> bool:
        """Add the pair (s, y); returns False (and skips it) when it fails the curvature condition."""
        names = self.param_names
        s_flat, y_flat = flatten(s, names).double(), flatten(y, names).double()
        sy = float(s_flat @ y_flat)
        if not sy > self.min_curvature * float(s_flat.norm() * y_flat.norm()):
            self.skipped += 1
            return False
        self._pairs.append((s_flat.clone(), y_flat.clone()))
        return True

    @classmethod
    def from_hvp(cls, hvp_fn: Callable[[ParamVector], ParamVector], directions: Iterable[Mapping[str, Tensor]],
                 param_shapes: Mapping[str, torch.Size], **kwargs) -> "LBFGSInverse":
        """Pairs ``(s, hvp_fn(s))`` for each direction ``s``."""
        op = cls(param_shapes, **kwargs)
        for s in directions:
            op.update(s, hvp_fn(dict(s)))
        return op

    def _damped(self, damping: float) -> list[tuple[Tensor, Tensor]]:
        if not self._pairs:
            raise RuntimeError("LBFGSInverse has no (s, y) pairs yet")
        return [(s, y + damping * s) for s, y in self._pairs]

    def _gamma(self, pairs: list[tuple[Tensor, Tensor]], damping: float) -> float:
        """The initial inverse scale H0 = gamma I (see the module docstring)."""
        if self.initial == "damping" and damping > 0:
            return 1.0 / damping
        s_new, y_new = pairs[-1]
        return float((s_new @ y_new) / (y_new @ y_new))

    def _inverse_mv(self, v: ParamVector, damping: float) -> ParamVector:
        pairs = self._damped(damping)
        names = self.param_names
        q = flatten(v, names).double()
        alphas = []
        for s, y in reversed(pairs):
            rho = 1.0 / (s @ y)
            a = rho * (s @ q)
            q = q - a * y
            alphas.append((rho, a))
        r = q * self._gamma(pairs, damping)
        for (s, y), (rho, a) in zip(pairs, reversed(alphas)):
            b = rho * (y @ r)
            r = r + (a - b) * s
        return unflatten(r, self.param_shapes)

    def _mv(self, v: ParamVector, damping: float = 0.0) -> ParamVector:
        pairs = self._damped(damping)
        S = torch.stack([s for s, _ in pairs], dim=1)
        Y = torch.stack([y for _, y in pairs], dim=1)
        sigma = 1.0 / self._gamma(pairs, damping)  # B0 = sigma I
        SY = S.T @ Y
        L = torch.tril(SY, diagonal=-1)
        D = torch.diag(torch.diagonal(SY))
        middle = torch.cat([torch.cat([sigma * S.T @ S, L], 1), torch.cat([L.T, -D], 1)], 0)
        x = flatten(v, self.param_names).double()
        W = torch.cat([sigma * S, Y], dim=1)
        out = sigma * x - W @ torch.linalg.solve(middle, W.T @ x)
        return unflatten(out, self.param_shapes)
