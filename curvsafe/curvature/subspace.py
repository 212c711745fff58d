"""Warm-started truncated eigenbases of dense factors that are decomposed again and again (CurvSafe's refreshes).

Convention. A dense PSD factor ``F`` (d x d) with ``d >= SubspaceEigen.min_dim`` keeps only its top ``k = rank``
eigenpairs; the left-out part stands as one isotropic eigenvalue, as for sketched factors
(:mod:`curvsafe.curvature.lowrank`, whose products and projections take the result unchanged):

    ``F ≈ Q diag(lam) Q^T + rest * (I - Q Q^T)``,  ``rest = tr(F_rest) / (d - k)``,  ``F_rest = P F P``,
    ``P = I - Q Q^T``

``rest`` is the plain mean of the left-out eigenvalues (zeros included), exact from the dense ``F``: with
``Q^T F Q = diag(lam)`` (a Rayleigh-Ritz basis), ``tr(F_rest) = tr(F) - sum(lam)``. Why not the energy-weighted mean
of restore's sketched factors (lowrank's module docstring), which suits preconditioning gradients: CurvSafe's projection
damps the wrapped optimizer's *updates*, which meet every direction about alike (AdamW's normalised steps), so the
constant that stands for the left-out eigenvalues weighs each direction once. Measured on the default testbed's
attack (exploration, the recipe's factors after 150 steps, truncations of the 128- and 256-dimensional factors
against their full decomposition, relative error of the projected update): at rank 16 / 32 / 64, AdamW's update
15.8% / 8.3% / 2.5% with the plain mean against 28.8% / 14.0% / 4.6% energy-weighted and 24.1% / 12.5% / 3.6% with
``rest = 0``; a training gradient 30.8% / 18.4% / 4.6% against 46.6% / 23.9% / 6.7% and 58.4% / 32.9% / 7.9%.
End to end (``benchmarks/optimizer.py``, the guarded recipe with every factor of 128+ dimensions cut to 32 pairs,
default testbed, mix attack, seeds 0-4): this module's bases met the targets on 3 of 5 seeds with the mean rest and
1 of 5 energy-weighted; sketched factors (:mod:`.lowrank`, which CurvSafe also gives the mean rest) 4 of 5 against 2
of 5; the full decompositions 4 of 5 (README, **Refreshes at LLM scale**).

``Q`` comes from ``iterations`` steps of subspace iteration, ``Q <- orth(F Q)``, started at the basis of the
previous decomposition of the same factor, then a Rayleigh-Ritz step (``eigh`` of the k x k matrix ``Q^T F Q``).
Between refreshes an EMA factor moves by a fraction of itself, so the iteration goes on where the last one stopped:
each step shrinks the angle between ``Q`` and the top-k eigenspace by about ``lam_{k+1} / lam_k`` (Golub & Van
Loan, Sec. 8.2.4). Without a previous basis (the first decomposition, or one of another size) the top k come from
a full float32 ``eigh`` (:func:`~curvsafe.curvature.eigen.safe_eigh_many`). Cost of a warm decomposition:
``iterations + 1`` products ``F Q`` (``2 d^2 k`` flops each), ``iterations`` QRs of d x k and one k x k ``eigh``,
where a full ``eigh`` costs ``O(d^3)`` at a LAPACK or cuSOLVER rate far below a GEMM's (measured on a 2-core CPU
at d = 2048, k = 256: 0.05 s against 0.35 s; ``benchmarks/scale.py`` measures CurvSafe's step with and without
it).

What holds (tested in float32 against float64 decompositions of the dense factor): a warm start at an invariant
subspace (the exact top-k eigenvectors) returns the exact top-k eigenpairs and the exact mean rest; a
factor of rank at most ``k`` is reproduced exactly (``rest = 0``); repeated decompositions of a fixed factor
converge to its top-k eigenpairs. Otherwise the kept pairs lag a moving factor by the iteration's convergence; the
result is a Rayleigh-Ritz approximation (each ``lam`` at most the true eigenvalue of its rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import Tensor

from .eigen import _check_finite, first_equal, safe_eigh_many


@dataclass(frozen=True)
class SubspaceEigen:
    """When and how dense factors are decomposed to a warm-started truncated eigenbasis (module docstring).

    Attributes:
        min_dim: dense factors of at least this dimension are truncated; smaller ones get a full ``eigh``. 1024
            leaves every factor of the testbeds and of models with hidden size below 1024 exact.
        rank: eigenpairs kept per truncated factor (``k``).
        iterations: subspace-iteration steps per decomposition (each one more product ``F Q`` and a QR).
    """

    min_dim: int = 1024
    rank: int = 256
    iterations: int = 1

    def __post_init__(self):
        if self.min_dim < 1 or self.rank < 1 or self.iterations < 1:
            raise ValueError(f"SubspaceEigen needs min_dim >= 1, rank >= 1 and iterations >= 1; got {self}")

    def applies(self, dim: int) -> bool:
        """Whether a dense factor of this dimension is truncated (and keeps fewer pairs than it has)."""
        return dim >= self.min_dim and self.rank < dim


def subspace_eigen(factor: Tensor, previous: Optional[Tensor], rank: int, iterations: int = 1,
                   name: str = "factor") -> tuple[Tensor, Tensor, Tensor]:
    """``(lam (k,), Q (d, k), rest)`` float32 of the dense PSD ``factor`` (module docstring), warm-started at
    ``previous`` (d, k) when given with that shape; ``lam`` ascending."""
    _check_finite(factor, name)
    F = factor.float()
    d = F.shape[0]
    k = min(rank, d)
    if previous is None or tuple(previous.shape) != (d, k):
        lam, Q = safe_eigh_many({name: F}, dtype=torch.float32)[name]
        lam, Q = lam[d - k:].contiguous(), Q[:, d - k:].contiguous()
    else:
        Q = previous.to(F.device, torch.float32)
        for _ in range(iterations):
            Q = torch.linalg.qr(F @ Q).Q
        FQ = F @ Q
        core = (Q.T @ FQ).double()
        vals, vecs = torch.linalg.eigh(0.5 * (core + core.T))
        lam, Q = vals.clamp_min(0).float(), (Q @ vecs.float()).contiguous()
    left_mass = max(float(F.diagonal().double().sum()) - float(lam.double().sum()), 0.0)
    return lam, Q, torch.tensor(left_mass / (d - k) if d > k else 0.0, device=F.device)


def subspace_eigens(named: Mapping[str, Tensor], previous: Mapping[str, Tensor], settings: SubspaceEigen
                    ) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """:func:`subspace_eigen` of every factor in ``named``, each warm-started at ``previous[name]`` when there is
    one; equal factors (an input shared by q/k/v) are decomposed once and share the result."""
    done: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    for key, first in first_equal(named).items():
        done[key] = done[first] if first != key else subspace_eigen(named[key], previous.get(key), settings.rank,
                                                                     settings.iterations, key)
    return done
