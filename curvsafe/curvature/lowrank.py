"""Memory-bounded Kronecker factors: a streamed Nyström sketch and a truncated eigenbasis with an isotropic rest.

Convention. A K-FAC factor ``F`` (``A`` or ``G``, d x d, PSD) with ``d > LowRank.max_dense_dim`` is never formed.
Its fit keeps the sketch ``Y = F Omega`` (d x s, ``s = rank + oversample``) for a fixed orthonormal test matrix
``Omega`` (Gaussian, QR-orthonormalised, seeded by ``(d, s)`` only: every factor of that size shares it, so token
sums, means, EMAs and the ``torch.distributed`` all-reduce act on sketches exactly as on the dense factors), and the
exact trace ``tr(F)``. Memory per factor: ``d * s`` floats instead of ``d * d``. The eigen-approximation is

    ``F ≈ Q diag(lam) Q^T + rest * (I - Q Q^T)``,  ``Q`` (d, k) orthonormal, ``k = min(rank, d)``

with ``(Q, lam)`` the top-k eigenpairs of the Nyström approximation ``F_nys = Y (Omega^T Y)^+ Y^T`` (computed
stably with a small shift, Tropp, Yurtsever, Udell & Cevher 2017, Alg. 3) and
``rest = (tr(F) - sum(lam)) / (r - k)`` (clamped at 0) with ``r = min(d, rows summed into F)``, a bound on
``rank(F)``: the mean of the nonzero eigenvalues the basis leaves out. A gradient of the block lies in the span
of those rows (``sum_t g_t a_t^T``), so that is the curvature it meets outside ``Q``; dividing by ``d - k``
instead would count the null space and, with fewer rows than ``d``, understate it (measured on the 1B shape:
``benchmarks/scale.py``). Directions outside the rows' span are charged the same ``rest``.

What holds (tested in float64 against the dense factor): ``F_nys ⪯ F`` so ``sum(lam)`` never exceeds the true
top-k sum and ``rest`` is at least the true mean of the left-out nonzero eigenvalues; the approximation is
exact (``rest = 0``) when ``rank(F) <= k``, e.g. a factor fitted on fewer tokens than ``rank`` (the token
matrix is the factor's square root). Otherwise the error is that of a rank-k truncation
plus the sketch's loss; it is measured, not bounded, by ``benchmarks/scale.py`` on the operator that matters
(the preconditioned safety gradient) against the dense factors.

Products with a block whose factors are truncated (:func:`truncated_kron_apply`) split a (d_out, d_in) matrix
into the four Kronecker subspaces (kept x kept, kept x rest, rest x kept, rest x rest); each gets its eigenvalue
product, with the isotropic ``rest`` standing for every left-out eigenvalue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class LowRank:
    """When and how K-FAC factors are kept as a truncated eigenbasis instead of a dense matrix.

    Attributes:
        max_dense_dim: factors up to this dimension stay dense (exact); larger ones are sketched. 2048 keeps
            every factor of a model with hidden size <= 2048 exact and bounds those of 7B-70B models.
        rank: eigenvectors kept per sketched factor (``k``).
        oversample: extra sketch columns (``s = rank + oversample``); more makes the kept eigenpairs more
            accurate at ``d * oversample`` floats per factor.
    """

    max_dense_dim: int = 2048
    rank: int = 256
    oversample: int = 128

    def __post_init__(self):
        if self.max_dense_dim < 1 or self.rank < 1 or self.oversample < 0:
            raise ValueError(f"LowRank needs max_dense_dim >= 1, rank >= 1, oversample >= 0; got {self}")

    def sketched(self, dim: int) -> bool:
        """Whether a factor of this dimension is sketched (and the sketch is narrower than the factor)."""
        return dim > self.max_dense_dim and self.rank + self.oversample < dim

    @property
    def width(self) -> int:
        return self.rank + self.oversample


_OMEGA: dict[tuple, Tensor] = {}


def sketch_matrix(dim: int, width: int, device: torch.device) -> Tensor:
    """The shared orthonormal test matrix ``Omega`` (dim, width), float32, seeded by its shape only."""
    key = (dim, width, str(device))
    if key not in _OMEGA:
        gen = torch.Generator().manual_seed(1_000_003 * dim + width)
        gauss = torch.randn(dim, width, generator=gen, dtype=torch.float64)
        _OMEGA[key] = torch.linalg.qr(gauss).Q.float().to(device)
    return _OMEGA[key]


class SketchedFactor:
    """A PSD factor held as ``Y = F Omega``, ``tr(F)`` and the number of rows summed into it (see the module
    docstring).

    Supports what K-FAC does with a dense factor: in-place row updates (``F += rows^T rows``), ``+``, scalar
    ``*`` and ``/`` (sums, means and EMAs; a scalar leaves the row count alone, a sum adds the counts),
    ``clone``, ``trace()``, and :meth:`tensors` for an in-place all-reduce.
    """

    def __init__(self, Y: Tensor, trace: Tensor, rows: Optional[Tensor] = None):
        self.Y = Y
        self._trace = trace
        self._rows = rows if rows is not None else torch.zeros((), dtype=torch.float64, device=Y.device)

    @classmethod
    def zeros(cls, dim: int, width: int, device: torch.device) -> "SketchedFactor":
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return cls(torch.zeros(dim, width, device=device), zero, zero.clone())

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.Y.shape[0], self.Y.shape[0]))

    @property
    def omega(self) -> Tensor:
        return sketch_matrix(self.Y.shape[0], self.Y.shape[1], self.Y.device)

    @property
    def nbytes(self) -> int:
        return self.Y.numel() * self.Y.element_size()

    @property
    def rank_bound(self) -> int:
        """``rank(F)`` is at most the number of rows summed into it (and ``d``; ``d`` when the count is unknown)."""
        rows = int(round(float(self._rows)))
        return min(self.Y.shape[0], rows) if rows > 0 else self.Y.shape[0]

    def add_rows(self, rows: Tensor) -> "SketchedFactor":
        """``F += rows^T rows`` for ``rows`` (n, d), in place."""
        rows = rows.float()
        self.Y.addmm_(rows.T, rows @ self.omega)
        self._trace += rows.double().square().sum()
        self._rows += rows.shape[0]
        return self

    def trace(self) -> Tensor:
        return self._trace.float()

    def tensors(self) -> list[Tensor]:
        return [self.Y, self._trace, self._rows]

    def clone(self) -> "SketchedFactor":
        return SketchedFactor(self.Y.clone(), self._trace.clone(), self._rows.clone())

    def _check(self, other: "SketchedFactor") -> None:
        if not isinstance(other, SketchedFactor) or other.Y.shape != self.Y.shape:
            raise TypeError("a sketched factor combines only with a sketch of the same shape")

    def __add__(self, other: "SketchedFactor") -> "SketchedFactor":
        self._check(other)
        return SketchedFactor(self.Y + other.Y, self._trace + other._trace, self._rows + other._rows)

    def add_(self, other: "SketchedFactor") -> "SketchedFactor":
        self._check(other)
        self.Y.add_(other.Y)
        self._trace += other._trace
        self._rows += other._rows
        return self

    def __mul__(self, c: float) -> "SketchedFactor":
        return SketchedFactor(self.Y * c, self._trace * c, self._rows.clone())

    __rmul__ = __mul__

    def __truediv__(self, c: float) -> "SketchedFactor":
        return SketchedFactor(self.Y / c, self._trace / c, self._rows.clone())

    def __itruediv__(self, c: float) -> "SketchedFactor":
        self.Y /= c
        self._trace /= c
        return self

    def state(self) -> dict:
        return {"sketch": self.Y, "trace": self._trace, "rows": self._rows}

    @classmethod
    def from_state(cls, state: dict, device: Optional[torch.device] = None) -> "SketchedFactor":
        return cls(*(state[k] if device is None else state[k].to(device) for k in ("sketch", "trace", "rows")))

    def eigen(self, rank: int, name: str = "factor") -> tuple[Tensor, Tensor, Tensor]:
        """``(lam (k,), Q (d, k), rest)`` float32 (see the module docstring); ``k = min(rank, sketch width)``."""
        if not bool(torch.isfinite(self.Y).all()) or not bool(torch.isfinite(self._trace)):
            raise FloatingPointError(f"factor {name} has non-finite entries; refusing to eigendecompose it")
        Y, omega = self.Y.double(), self.omega.double()
        d, s = Y.shape
        k = min(rank, s)
        if not bool(Y.any()):  # no curvature seen (e.g. a block the loss does not reach): all of it is the rest
            return (torch.zeros(k, device=Y.device), omega[:, :k].float().contiguous(),
                    torch.tensor(float(self._trace) / max(self.rank_bound - k, 1), device=Y.device))
        shift = float(torch.finfo(torch.float32).eps) * max(float(torch.linalg.matrix_norm(Y, ord=2)), 1e-300)
        Y_shift = Y + shift * omega
        core = omega.T @ Y_shift
        chol = torch.linalg.cholesky(0.5 * (core + core.T) + 1e-12 * shift * torch.eye(s, dtype=Y.dtype,
                                                                                        device=Y.device))
        B = torch.linalg.solve_triangular(chol, Y_shift.T, upper=False).T  # Y_shift chol^{-T}
        U, sv, _ = torch.linalg.svd(B, full_matrices=False)
        lam = (sv[:k].square() - shift).clamp_min(0)
        left = self.rank_bound - k  # the nonzero eigenvalues the basis leaves out, at most
        rest = max(float(self._trace) - float(lam.sum()), 0.0) / left if left > 0 else 0.0
        return lam.float(), U[:, :k].float().contiguous(), torch.tensor(rest, device=Y.device)


Transform = Callable[[Tensor], Tensor]


def truncated_kron_apply(V: Tensor, QA: Tensor, lam_A: Tensor, rest_A: Optional[Tensor], QG: Tensor, lam_G: Tensor,
                         rest_G: Optional[Tensor], core: Tensor, transform: Transform) -> Tensor:
    """``V`` (d_out, d_in) through the block's Kronecker eigenbasis when either factor is truncated.

    ``core`` (k_G, k_A) is the already transformed eigenvalue of each kept x kept direction (K-FAC's
    ``lam_G lam_A^T`` or EK-FAC's corrected values); the other three subspaces get ``transform`` of K-FAC's
    products with ``rest``. A factor with ``rest=None`` is dense (its ``Q`` square): its complement is empty.
    """
    VA = V @ QA  # (d_out, k_A)
    C = QG.T @ VA  # (k_G, k_A)
    out = QG @ (core * C) @ QA.T
    if rest_A is not None:  # G-kept rows (all rows when G is dense), A-left-out columns
        GV = QG.T @ V
        out += QG @ (transform(lam_G * rest_A)[:, None] * (GV - C @ QA.T))
    if rest_G is not None:  # G-left-out rows, A-kept columns
        out += ((VA - QG @ C) * transform(rest_G * lam_A)[None, :]) @ QA.T
    if rest_A is not None and rest_G is not None:
        rest_both = V - QG @ GV - VA @ QA.T + QG @ C @ QA.T
        out += transform(rest_G * rest_A) * rest_both
    return out


def truncated_vector_apply(b: Tensor, QG: Tensor, scale: Tensor, rest_scale: Optional[Tensor]) -> Tensor:
    """A bias-like vector (d_out,) through ``G``'s eigenbasis: ``scale`` on the kept directions, ``rest_scale`` on
    the left-out ones (``None``: ``QG`` is square, nothing left out)."""
    coeffs = QG.T @ b
    out = QG @ (coeffs * scale)
    if rest_scale is not None:
        out += rest_scale * (b - QG @ coeffs)
    return out
