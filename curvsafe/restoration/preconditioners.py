"""The task-curvature metric of each restore method: ``apply(g) ≈ (H + lambda I)^{-1} g`` and ``quad(d) = d^T H d``.

H is the curvature of the task loss at the current parameters (where the task is flat, steps are cheap). The
damping ``lambda`` is relative: ``damping * (g^T H g / g^T g)`` for the gradient at refresh time, so one setting
works across models and scales.

- ``sgd``: no curvature (H = 0, the step is the gradient).
- ``kfac`` (the default, :class:`~curvsafe.config.RestoreConfig`) / ``ekfac``: K-FAC / EK-FAC factors of the task
  loss (Monte Carlo Fisher, sampled labels); linear blocks only.
- ``lbfgs`` (the paper's): L-BFGS inverse built from task GGN-vector products along conjugate (CG) directions
  from the gradient (pairs ``(p, G p)``; the GGN is the positive semi-definite part of the Hessian, so every pair
  passes the curvature condition), with ``H0 = I / lambda``: unexplored directions count as flat. (Pairs along
  power-iteration directions with the classic secant scaling ``H0 = (s.y / y.y) I`` stayed close to the
  gradient's step and, measured on the testbed, restored no refusal.)
- ``cg``: truncated Newton, a few CG iterations on exact task GGN-vector products.
"""

from __future__ import annotations

from typing import Mapping, Optional

from torch import Tensor

from ..capture import block_of
from ..config import RESTORE_METHODS
from ..curvature import EKFAC, KFAC, CGInverse, GGNOperator, LBFGSInverse
from ..curvature.lowrank import LowRank
from ..curvature.vectors import ParamVector, dot

METHODS = RESTORE_METHODS


class Preconditioner:
    """No curvature (``sgd``): the step is the gradient; subclasses supply a task-curvature metric."""
    name = "sgd"

    def refresh(self, model, task_batches: list, params: Mapping[str, Tensor], grad: ParamVector) -> None:
        """Rebuild the curvature at the current parameters (``grad``: the direction it must serve)."""

    def apply(self, g: ParamVector) -> ParamVector:
        return dict(g)

    def quad(self, d: ParamVector) -> float:
        return 0.0


class _OperatorPreconditioner(Preconditioner):
    """Shared: an operator with mv / inverse_mv and a relative damping."""

    def __init__(self, damping: float):
        self.damping_rel = damping
        self.op = None
        self.damping = 0.0

    def _set_damping(self, grad: ParamVector) -> None:
        hg = self.op.mv(grad)
        self.damping = self.damping_rel * max(float(dot(grad, hg)) / max(float(dot(grad, grad)), 1e-30), 1e-12)

    def apply(self, g: ParamVector) -> ParamVector:
        return self.op.inverse_mv(g, self.damping)

    def quad(self, d: ParamVector) -> float:
        return float(dot(d, self.op.mv(d)))


class KFACPreconditioner(_OperatorPreconditioner):
    """K-FAC factors of the task loss (Monte Carlo Fisher, labels drawn with ``seed``), refitted at each refresh;
    only their eigenbases are kept once decomposed (``keep_factors=False``)."""
    name = "kfac"
    cls = KFAC

    def __init__(self, damping: float, seed: int = 0, low_rank: Optional[LowRank] = LowRank()):
        super().__init__(damping)
        self.seed = seed
        self.low_rank = low_rank

    def refresh(self, model, task_batches, params, grad):
        owners = {n: n.rsplit(".", 1)[0] for n in params}
        modules = dict(model.named_modules())
        _linear_only(self.name, [n for n, m in owners.items() if block_of(m, modules[m]) is None])
        blocks = sorted(set(owners.values()))
        self.op = None  # the old curvature goes before the new is fitted (peak memory: one set, not two)
        self.op = self.cls(model, blocks, fisher_type="mc", seed=self.seed, progress=False,
                           low_rank=self.low_rank, keep_factors=False).fit(task_batches)
        _linear_only(self.name, sorted(set(params) - set(self.op.param_shapes)))
        self._set_damping(grad)


def _linear_only(method: str, uncovered: list[str]) -> None:
    """Refuse parameters outside the linear blocks that K-FAC covers (a DoRA adapter's magnitude vectors, PEFT's
    ``modules_to_save`` embeddings, norms), naming the methods that do cover them and the parameter selection that
    leaves them as they are."""
    if uncovered:
        raise ValueError(f"{method} covers linear blocks only; parameters {uncovered[:3]} are not (method lbfgs or "
                         "cg: exact GGN products cover every parameter; or restore the LoRA weights alone and leave "
                         "those as they are: params '*lora_A*' '*lora_B*', `--params` on the command line)")


class EKFACPreconditioner(KFACPreconditioner):
    """EK-FAC of the task loss (K-FAC plus the eigenvalue correction)."""
    name = "ekfac"
    cls = EKFAC


class LBFGSPreconditioner(_OperatorPreconditioner):
    """The paper's: an L-BFGS inverse from task GGN products along conjugate directions."""
    name = "lbfgs"

    def __init__(self, damping: float, pairs: int = 8, max_rows: Optional[int] = None,
                 max_tokens: Optional[int] = None):
        super().__init__(damping)
        self.pairs, self.max_rows, self.max_tokens = pairs, max_rows, max_tokens

    def refresh(self, model, task_batches, params, grad):
        """Pairs ``(p_k, (G + λI) p_k)`` along the conjugate directions of CG on ``(G + λI) x = grad``: with
        conjugate pairs the BFGS updates keep every secant equation (the hereditary property), so the inverse is
        exact on the explored Krylov space; power-iteration directions would collapse onto the top eigenvector."""
        ggn = GGNOperator(model, task_batches, list(params), max_rows=self.max_rows, max_tokens=self.max_tokens)
        hg = ggn.mv(grad)
        self.damping = self.damping_rel * max(float(dot(grad, hg)) / max(float(dot(grad, grad)), 1e-30), 1e-12)
        op = LBFGSInverse({n: p.shape for n, p in params.items()}, history=self.pairs, initial="damping")
        r = dict(grad)
        p = dict(grad)
        hp = hg
        rr = float(dot(r, r))
        previous: list[tuple[ParamVector, ParamVector, float]] = []  # (p_j, A p_j, p_j.A p_j)
        for k in range(self.pairs):
            if k > 0:
                for pj, apj, pap in previous:  # re-conjugate: rounding and noisy products erode conjugacy
                    coef = float(dot(apj, p)) / pap
                    p = {n: p[n] - coef * pj[n] for n in p}
                hp = ggn.mv(p)
            op.update(p, hp)  # the operator adds λ p itself when applied with damping λ
            ap = {n: hp[n] + self.damping * p[n] for n in p}
            curvature = float(dot(p, ap))
            if curvature <= 0 or rr == 0.0:
                break
            previous.append((p, ap, curvature))
            alpha = float(dot(r, p)) / curvature
            r = {n: r[n] - alpha * ap[n] for n in r}
            rr_new = float(dot(r, r))
            p = {n: r[n] + (rr_new / rr) * p[n] for n in r}
            rr = rr_new
        if op.num_pairs == 0:
            raise FloatingPointError("the task GGN gave no usable curvature pair")
        self.op = op


class CGPreconditioner(_OperatorPreconditioner):
    """Truncated Newton: a few CG iterations on exact task GGN products."""
    name = "cg"

    def __init__(self, damping: float, maxiter: int = 10, tol: float = 1e-3, max_rows: Optional[int] = None,
                 max_tokens: Optional[int] = None):
        super().__init__(damping)
        self.maxiter, self.tol, self.max_rows, self.max_tokens = maxiter, tol, max_rows, max_tokens

    def refresh(self, model, task_batches, params, grad):
        self.op = GGNOperator(model, task_batches, list(params), max_rows=self.max_rows, max_tokens=self.max_tokens)
        self._set_damping(grad)

    def apply(self, g):
        return CGInverse(self.op, tol=self.tol, maxiter=self.maxiter).inverse_mv(g, self.damping)


def make_preconditioner(method: str, damping: float, ggn_rows: Optional[int] = None, *,
                        ggn_tokens: Optional[int] = None, seed: int = 0,
                        low_rank: Optional[LowRank] = LowRank()) -> Preconditioner:
    """The preconditioner of ``method`` (one of :data:`METHODS`) with relative ``damping``; ``ggn_rows`` and
    ``ggn_tokens``: the rows and tokens of each pass of L-BFGS's and CG's GGN products at most (batches split and
    merged to them; :mod:`curvsafe.curvature.hvp`); ``seed`` and ``low_rank``: K-FAC's and EK-FAC's Monte Carlo
    labels and factor memory bound."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return {"sgd": lambda: Preconditioner(), "kfac": lambda: KFACPreconditioner(damping, seed, low_rank),
            "ekfac": lambda: EKFACPreconditioner(damping, seed, low_rank),
            "lbfgs": lambda: LBFGSPreconditioner(damping, max_rows=ggn_rows, max_tokens=ggn_tokens),
            "cg": lambda: CGPreconditioner(damping, max_rows=ggn_rows, max_tokens=ggn_tokens)}[method]()
