"""The safety projection of :class:`~curvsafe.optim.CurvSafe`: the safety curvature of the protected blocks and the
damping of updates along it.

Conventions (per captured block, weight as its (d_out, d_in) matrix, see :mod:`curvsafe.capture`):

- The curvature is the K-FAC ``A ⊗ G`` of the safety loss's NLL data, kept by a :class:`~curvsafe.curvature.KFAC`
  with ``ema_decay`` (each refit's factors merged into an EMA), float32; factors above ``low_rank.max_dense_dim``
  are sketched and used as a truncated eigenbasis with an isotropic rest (:mod:`curvsafe.curvature.lowrank`);
  dense factors of at least ``subspace.min_dim`` are decomposed to such a basis too, warm-started at the last
  refit's (:mod:`curvsafe.curvature.subspace`), so a refit costs no full ``eigh`` of a large factor. Either way the
  rest is the plain mean of the left-out eigenvalues (for sketched factors unless ``low_rank.mean_rest`` is False;
  the subspace module says why: the projection meets updates, not gradients).
- The update ``U`` of a block becomes ``QG ((QG^T U QA) * scale) QA^T`` with ``scale_ij = 1 / (1 + strength *
  lam_G_i * lam_A_j / mean)``; ``mean`` is the mean curvature eigenvalue over *all* protected parameters
  (``sum_blocks tr(A) tr(G)`` plus ``tr(G)`` per protected bias, over their number), so blocks that carry little
  safety curvature are barely touched. A protected bias gets ``1 / (1 + strength * lam_G / mean)`` in ``QG``'s
  basis; a truncated block's left-out directions the scale of their rest eigenvalue.
"""

from __future__ import annotations

from functools import cache
from typing import Callable, Collection, Optional

import torch
from torch import Tensor, nn

from ..capture import LinearBlock
from ..curvature import KFAC
from ..curvature.kfac import factor_eigens
from ..curvature.lowrank import LowRank, truncated_kron_apply, truncated_vector_apply
from ..curvature.subspace import SubspaceEigen, subspace_eigens
from ..kernels import kron_eigen_apply

_STACK_ENTRIES = 1 << 20  # blocks whose QA and QG hold at most this many entries are projected in stacked groups


class SafetyProjector:
    """Safety curvature of ``blocks`` (refitted by :meth:`refit`) and the projection of updates by it
    (:meth:`project`).

    Args:
        model: the model the blocks belong to (unwrapped).
        blocks: the protected blocks.
        strength: the damping strength (module docstring); 0 leaves every update as it is.
        ema_decay: weight of the previous factors at a refit.
        fisher_type: the Fisher of the K-FAC passes (``"empirical"`` or ``"mc"``).
        low_rank: the memory bound of the factors (None: all dense).
        subspace: which dense factors get a warm-started truncated eigenbasis (None: a full ``eigh`` each).
    """

    def __init__(self, model: nn.Module, blocks: list[LinearBlock], *, strength: float, ema_decay: float,
                 fisher_type: str, low_rank: Optional[LowRank], subspace: Optional[SubspaceEigen] = None):
        self.blocks = blocks
        self.strength = strength
        self.subspace = subspace
        self.kfac = KFAC(model, [b.name for b in blocks], fisher_type=fisher_type, ema_decay=ema_decay,
                         progress=False, low_rank=low_rank)
        self.eigen: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = {}  # QA, QG, weight scale, bias scale
        self.rests: dict[str, tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]] = {}  # truncated blocks
        self.damp = 0.0  # strength / mean eigenvalue (the truncated blocks' scales are computed from it)
        self._summary: Callable[[], dict[str, float]] = dict  # the last refit's spectrum summary, computed when read
        self._groups: list[tuple[list[LinearBlock], Tensor, Tensor, Tensor]] = []

    @property
    def fitted(self) -> bool:
        return bool(self.eigen)

    def refit(self, batches: list, protected: Collection[str], *, gradient: bool = False) -> Optional[dict]:
        """Merge the curvature of ``batches`` into the factors and recompute the projection; ``protected``: the
        names of the protected parameters (which biases count in the mean). Returns the K-FAC pass's gradient of
        the batches' mean NLL (by weight name) with ``gradient``."""
        self.kfac.fit(batches, gradient=gradient)
        self._decompose(protected)
        return self.kfac.gradient if gradient else None

    def _factor_eigen(self) -> dict[str, tuple[Tensor, Tensor, Optional[Tensor], float, int]]:
        """``"{block}.{A|G}"`` -> ``(lam, Q, rest, trace, dim)``; ``rest`` None for a dense factor."""
        named = {f"{n}.{k}": f for n, fs in self.kfac.factors.items() for k, f in (("A", fs.A), ("G", fs.G))}
        low, sub = self.kfac.low_rank, self.subspace
        warm = {k: f for k, f in named.items()
                if sub is not None and isinstance(f, Tensor) and sub.applies(f.shape[0])}
        # float32: the damping only resolves eigenvalues near the mean (tiny ones pass with scale ~1)
        eigen = factor_eigens({k: f for k, f in named.items() if k not in warm},
                              low.rank if low is not None else None, dtype=torch.float32,
                              mean_rest=low is not None and low.mean_rest is not False)
        if warm:  # each from the basis of the last refit (saved in the state, so a resumed run starts there too)
            previous = {f"{n}.{side}": Q for n, e in self.eigen.items() for side, Q in zip("AG", e[:2])}
            eigen.update(subspace_eigens(warm, previous, sub))
        return {key: (lam, Q, rest, float(lam.sum()) if rest is None else float(named[key].trace()), Q.shape[0])
                for key, (lam, Q, rest) in eigen.items()}

    def _decompose(self, protected: Collection[str]) -> None:
        """Per block: ``QA``, ``QG`` and the damping scales (weight (d_out, d_in), bias (d_out,); for a truncated
        block those of the kept eigenpairs, its rests in ``self.rests``), normalised by the mean curvature
        eigenvalue over all protected parameters."""
        eigen = self._factor_eigen()
        total, count = 0.0, 0
        for b in self.blocks:
            (*_, tr_A, d_A), (*_, tr_G, d_G) = eigen[f"{b.name}.A"], eigen[f"{b.name}.G"]
            total, count = total + tr_G * tr_A, count + d_G * d_A
            if b.bias_name in protected:
                total, count = total + tr_G, count + d_G
        mean = total / count
        self.damp = damp = self.strength / mean if mean > torch.finfo(torch.float32).tiny else 0.0
        self.eigen, self.rests = {}, {}
        for b in self.blocks:
            (lam_A, QA, rest_A, *_), (lam_G, QG, rest_G, *_) = eigen[f"{b.name}.A"], eigen[f"{b.name}.G"]
            self.eigen[b.name] = (QA, QG, 1.0 / (1.0 + damp * torch.outer(lam_G, lam_A)), 1.0 / (1.0 + damp * lam_G))
            if rest_A is not None or rest_G is not None:
                self.rests[b.name] = (lam_A, rest_A, lam_G, rest_G)
        self._groups = self._stacked_groups()
        # the eigenvalues alone (no bases: a summary read late must not keep old bases alive), summarised on demand
        values = [tuple((lam, None, rest, trace, dim) for lam, _, rest, trace, dim in (eigen[f"{b.name}.A"],
                                                                                      eigen[f"{b.name}.G"]))
                  for b in self.blocks]
        self._summary = cache(lambda: _spectrum(values, mean, damp))

    @property
    def spectrum(self) -> dict[str, float]:
        """The last refit's summary of the safety curvature (:func:`_spectrum`; {} before the first), computed on
        first reading: most refits are never summarised (only logged steps and traces read it)."""
        return self._summary()

    def spectrum_of_this_refit(self) -> Callable[[], dict[str, float]]:
        """The last refit's :attr:`spectrum` as a function to call later (still this refit's after the next)."""
        return self._summary

    def _stacked_groups(self) -> list[tuple[list[LinearBlock], Tensor, Tensor, Tensor]]:
        """The dense blocks as groups for one ``kron_eigen_apply`` call each: small blocks of equal shapes together
        with their ``QA``, ``QG``, ``scale`` stacked (many small LoRA blocks cost one batched GEMM chain, not one call
        each), a block with large bases alone and unstacked (no copy; the call overhead is negligible there)."""
        groups: dict[tuple, list[LinearBlock]] = {}
        for b in self.blocks:
            if b.name in self.rests:  # truncated: projected on its own
                continue
            QA, QG, scale, _ = self.eigen[b.name]
            small = QA.numel() + QG.numel() <= _STACK_ENTRIES
            key = (tuple(scale.shape), QA.dtype, QA.device) if small else (b.name,)
            groups.setdefault(key, []).append(b)
        out = []
        for blocks in groups.values():
            e = [self.eigen[b.name][:3] for b in blocks]
            out.append((blocks, *(e[0] if len(e) == 1 else [torch.stack(t) for t in zip(*e)])))
        return out

    def rest_scale(self, lam: Tensor) -> Tensor:
        """The projection's scale of curvature eigenvalue(s) ``lam`` (truncated blocks' left-out directions)."""
        return 1.0 / (1.0 + self.damp * lam)

    def project(self, deltas: dict[str, Tensor]) -> None:
        """Project the updates ``deltas`` (by parameter name: every protected weight, the protected biases) in
        place of their entries."""
        for blocks, QA, QG, scale in self._groups:
            Vs = [b.as_matrix(deltas[b.weight_name]) for b in blocks]
            out = ([kron_eigen_apply(Vs[0], QA, QG, scale)] if len(blocks) == 1
                   else kron_eigen_apply(torch.stack(Vs), QA, QG, scale).unbind(0))
            for b, V, new in zip(blocks, Vs, out):
                deltas[b.weight_name] = b.from_matrix(new.to(V.dtype))
        for name, (lam_A, rest_A, lam_G, rest_G) in self.rests.items():
            block = next(b for b in self.blocks if b.name == name)
            QA, QG, scale, _ = self.eigen[name]
            V = block.as_matrix(deltas[block.weight_name])
            new = truncated_kron_apply(V.float(), QA, lam_A, rest_A, QG, lam_G, rest_G, scale, self.rest_scale)
            deltas[block.weight_name] = block.from_matrix(new.to(V.dtype))
        for block in self.blocks:
            if block.bias_name in deltas:
                _, QG, _, bias_scale = self.eigen[block.name]
                b = deltas[block.bias_name]
                rest_G = self.rests.get(block.name, (None,) * 4)[3]
                rest = None if rest_G is None else self.rest_scale(rest_G).to(b.dtype)
                deltas[block.bias_name] = truncated_vector_apply(b, QG.to(b.dtype), bias_scale.to(b.dtype), rest)

    def state_dict(self) -> dict:
        """Factors (sketched ones as plain tensors), eigenbases, scales and rests: loadable with ``weights_only``."""
        return {"factors": self.kfac.state_dict()["factors"],
                "eigen": {n: {"QA": QA, "QG": QG, "scale": s, "bias_scale": bs}
                          for n, (QA, QG, s, bs) in self.eigen.items()},
                "rests": {n: list(r) for n, r in self.rests.items()}, "damp": self.damp}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        if state["factors"]:
            self.kfac.load_state_dict({"factors": state["factors"]}, device=device)
        else:
            self.kfac.reset()

        def to(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.to(device)

        self.eigen = {n: (to(e["QA"]), to(e["QG"]), to(e["scale"]), to(e["bias_scale"]))
                      for n, e in state["eigen"].items()}
        self.rests = {n: tuple(to(t) for t in r) for n, r in state["rests"].items()}
        self.damp = float(state["damp"])
        self._groups = self._stacked_groups() if self.eigen else []
        self._summary = dict  # not saved: the next refit summarises again


def _levels(lam: Tensor, rest: Optional[Tensor], dim: int) -> tuple[Tensor, Tensor]:
    """A factor's eigenvalues as ``(values, multiplicities)``, float64: the kept ones once each and, for a truncated
    factor, its rest eigenvalue ``dim - k`` times."""
    lam = lam.detach().double().cpu().clamp_min(0)
    if rest is None:
        return lam, torch.ones_like(lam)
    value = torch.tensor([max(float(rest), 0.0)], dtype=torch.float64)
    return torch.cat([lam, value]), torch.cat([torch.ones_like(lam), value.new_tensor([dim - lam.numel()])])


def _spectrum(factors: list, mean: float, damp: float) -> dict[str, float]:
    """A summary of the safety curvature's Kronecker eigenvalues ``lam = lam_G * lam_A`` over the protected weights
    (``factors``: per block the ``(lam, Q, rest, trace, dim)`` of A, then of G, ``Q`` unused (None from a refit);
    ``damp``: strength / mean), for logs and diagnosis:

    - ``directions``: how many there are (the weights' parameter count);
    - ``damped``: the share of them the projection damps by more than half (``damp * lam > 1``);
    - ``damped_curvature``: the share of the total curvature ``sum lam`` that lies in those;
    - ``effective_rank``: ``(sum lam)^2 / sum lam^2``, the participation ratio (how many directions the curvature
      is spread over);
    - ``top``: the largest eigenvalue over the mean (``mean`` counts protected biases too, as the projection's does).

    Computed from each factor's eigenvalues alone (A's sorted, searched for each eigenvalue of G), never from the
    ``d_G x d_A`` products: O((k_A + k_G) log k_A) per block.
    """
    count = damped = total = in_damped = square = top = 0.0
    for (lam_A, _, rest_A, _, d_A), (lam_G, _, rest_G, _, d_G) in factors:
        (vals_A, mult_A), (vals_G, mult_G) = _levels(lam_A, rest_A, d_A), _levels(lam_G, rest_G, d_G)
        count += float(mult_A.sum() * mult_G.sum())
        total += float((vals_A * mult_A).sum() * (vals_G * mult_G).sum())
        square += float((vals_A.square() * mult_A).sum() * (vals_G.square() * mult_G).sum())
        if vals_A.numel() and vals_G.numel():
            top = max(top, float(vals_A.max() * vals_G.max()))
        if damp <= 0 or not vals_A.numel():
            continue
        order = torch.argsort(vals_A)
        sorted_A = vals_A[order]
        # suffix sums of the multiplicities and the curvature of A's eigenvalues, from each position to the end
        tail_mult = torch.cat([mult_A[order].flip(0).cumsum(0).flip(0), mult_A.new_zeros(1)])
        tail_mass = torch.cat([(sorted_A * mult_A[order]).flip(0).cumsum(0).flip(0), mult_A.new_zeros(1)])
        positive = vals_G > 0
        g, m = vals_G[positive], mult_G[positive]
        first = torch.searchsorted(sorted_A, 1.0 / (damp * g), right=True)  # A's first index past the bar
        damped += float((m * tail_mult[first]).sum())
        in_damped += float((m * g * tail_mass[first]).sum())
    return {"directions": count, "damped": damped / count if count else 0.0,
            "damped_curvature": in_damped / total if total > 0 else 0.0,
            "effective_rank": total ** 2 / square if square > 0 else 0.0, "top": top / mean if mean > 0 else 0.0}
