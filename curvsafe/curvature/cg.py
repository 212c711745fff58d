"""Conjugate gradients for inverse-curvature-vector products ``(C + damping I)^{-1} v``.

Works on flat vectors (:func:`conjugate_gradient`) or as an operator over parameter dicts (:class:`CGInverse`),
optionally preconditioned by another operator's ``inverse_mv`` (e.g. K-FAC). With an indefinite ``C`` (a Hessian
away from a minimum) CG stops at the first direction of non-positive curvature and reports it (truncated Newton).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .base import CurvatureOperator
from .vectors import ParamVector, flatten, unflatten


@dataclass
class CGResult:
    """A CG solve: the solution ``x``, the iterations run, the final residual norm, whether it converged and
    whether it stopped at a direction of negative curvature."""

    x: Tensor
    iterations: int
    residual_norm: float
    converged: bool
    negative_curvature: bool = False


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, *, x0: Optional[Tensor] = None,
                       tol: float = 1e-6, maxiter: Optional[int] = None,
                       precondition: Optional[Callable[[Tensor], Tensor]] = None) -> CGResult:
    """Solve ``A x = b`` for symmetric positive-definite ``A`` until ``||r|| <= tol * ||b||``."""
    maxiter = b.numel() if maxiter is None else maxiter
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    b_norm = float(b.norm())
    if b_norm == 0.0:
        return CGResult(torch.zeros_like(b), 0, 0.0, True)
    z = precondition(r) if precondition else r
    p = z.clone()
    rz = torch.dot(r, z)
    for it in range(1, maxiter + 1):
        ap = matvec(p)
        curvature = torch.dot(p, ap)
        if float(curvature) <= 0:
            return CGResult(x, it - 1, float(r.norm()), False, negative_curvature=True)
        alpha = rz / curvature
        x.add_(alpha * p)
        r.sub_(alpha * ap)
        res = float(r.norm())
        if res <= tol * b_norm:
            return CGResult(x, it, res, True)
        z = precondition(r) if precondition else r
        rz_new = torch.dot(r, z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return CGResult(x, maxiter, float(r.norm()), False)


class CGInverse(CurvatureOperator):
    """``inverse_mv`` of ``operator`` by (preconditioned) CG; ``mv`` is the operator's own product.

    The last solve's :class:`CGResult` (without ``x``) is kept in :attr:`last_result` for reporting.
    """

    def __init__(self, operator: CurvatureOperator, *, tol: float = 1e-6, maxiter: Optional[int] = None,
                 preconditioner: Optional[CurvatureOperator] = None, preconditioner_damping: Optional[float] = None):
        self.operator = operator
        self.param_shapes = dict(operator.param_shapes)
        self.tol, self.maxiter = tol, maxiter
        self.preconditioner = preconditioner
        self.preconditioner_damping = preconditioner_damping
        self.last_result: Optional[CGResult] = None

    def _mv(self, v: ParamVector) -> ParamVector:
        return self.operator.mv(v)

    def _inverse_mv(self, v: ParamVector, damping: float) -> ParamVector:
        names, shapes = self.param_names, self.param_shapes
        b = flatten(v, names).double()

        def matvec(x: Tensor) -> Tensor:
            xv = unflatten(x.to(v[names[0]].dtype), shapes)
            return flatten(self.operator.mv(xv), names).double() + damping * x

        pd = damping if self.preconditioner_damping is None else self.preconditioner_damping

        def apply_preconditioner(r: Tensor) -> Tensor:
            return flatten(self.preconditioner.inverse_mv(unflatten(r.to(v[names[0]].dtype), shapes), pd),
                           names).double()

        result = conjugate_gradient(matvec, b, tol=self.tol, maxiter=self.maxiter,
                                    precondition=apply_preconditioner if self.preconditioner is not None else None)
        self.last_result = CGResult(torch.empty(0), result.iterations, result.residual_norm, result.converged,
                                    result.negative_curvature)
        return unflatten(result.x, shapes)
