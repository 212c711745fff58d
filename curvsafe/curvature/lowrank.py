"""Memory-bounded Kronecker factors: a streamed Nyström sketch and a truncated eigenbasis with an isotropic rest.

Convention. A K-FAC factor ``F`` (``A`` or ``G``, d x d, PSD) with ``d > LowRank.max_dense_dim`` is never formed.
Its fit keeps the sketch ``Y = F Omega`` (d x s, ``s = rank + oversample``) for a fixed orthonormal test matrix
``Omega``, the probe ``Z = F Psi`` (d x p, ``p = LowRank.probes``) for a second, independent one, and the exact
trace ``tr(F)``. Both test matrices are Gaussian, QR-orthonormalised and seeded by their shape only: every factor of
that size shares them, so token sums, means, EMAs and the ``torch.distributed`` all-reduce act on sketches exactly
as on the dense factors. Memory per factor: ``d * (s + p)`` floats instead of ``d * d``. The eigen-approximation is

    ``F ≈ Q diag(lam) Q^T + rest * (I - Q Q^T)``,  ``Q`` (d, k) orthonormal, ``k = min(rank, d)``

with ``(Q, lam)`` the top-k eigenpairs of the Nyström approximation ``F_nys = Y (Omega^T Y)^+ Y^T`` (computed
stably with a small shift, Tropp, Yurtsever, Udell & Cevher 2017, Alg. 3) and ``rest`` the *energy-weighted* mean
eigenvalue of the left-out part ``F_rest = P F P`` (``P = I - Q Q^T``):

    ``rest = tr(F_rest^2) / tr(F_rest)``,  ``tr(F_rest) = tr(F) - sum(lam)``,
    ``tr(F_rest^2) ≈ (d / p) ||P Z||_F^2``  (Hutchinson's estimate with the independent probe ``Psi``).

Why this mean: the operator meets gradients ``sum_t g_t a_t^T``, whose expected energy along an eigenvector of a
factor is proportional to its eigenvalue, so the constant that stands for the left-out eigenvalues on such vectors
weights each by itself (``sum lam_i^2 / sum lam_i``). The plain mean over the left-out directions understates the
curvature those vectors meet, most of all when the factor's rank is below its row count (the gradient factors of
the 1B shape: rank below 1536 from 2048 tokens), and over-amplifies them in an inverse. Measured on the 1B shape
(``benchmarks/scale.py``: K-FAC preconditioned gradient at damping 0.1x its Rayleigh quotient, against dense
factors): rank 256, 11.8% -> 9.3% relative error; rank 1024, 8.3% -> 5.9%; with the exact top eigenvectors instead
of the sketch's, 9.7% -> 6.8% and 5.0% -> 1.7%; with ``p = 16`` the error equals the one with the exact
``tr(F_rest^2)`` to 4 digits there. Those 2048 tokens leave the 8192-dimensional factors of rank below 1536, which
flatters any truncation: on full-rank factors (16384 tokens) the same layer gives 18.1% at rank 256, 16.1% at 861
and 15.1% at 1356 (random weights: a flat spectrum), and the exact top eigenvectors with this rest would still give
14.9% and 9.8% at 256 and 1356: the left-out spectrum, not the sketch, is most of it. The weighted mean is not
better everywhere: on a full-rank toy factor with a flat left-out spectrum and low damping it was slightly worse
(51% against 49% error, a sketch far too narrow for that factor).
CurvSafe's projection asks for the plain mean over all ``d - k`` left-out directions instead
(``LowRank.mean_rest``, None by default: each consumer's own choice): it damps updates, which meet every direction
about alike (:mod:`.subspace`).
A sketch saved without a probe (``probes = 0``, or older states) falls back to the plain mean
``(tr(F) - sum(lam)) / (r - k)`` with ``r = min(d, rows summed into F)``, a bound on ``rank(F)``.

A second pass (``LowRank.passes = 2``, one step of subspace iteration) re-sketches each factor with its own test
matrix ``Omega_2 = orth(Y)`` from the first pass, ``Y_2 = F Omega_2``, over the same batches (the same Monte Carlo
labels: the generator is rewound), and takes the Nyström eigenpairs from ``(Omega_2, Y_2)``. On a flat spectrum one
pass's basis is inaccurate; the second pass sharpens it (Halko, Martinsson & Tropp 2011, Sec. 4.5) for one more
forward and backward over the data and ``d * s`` floats per factor (``Omega_2``, kept with the sketch). Measured
(``benchmarks/scale.py``, 1B shape, damping 0.1x): 2048 tokens, rank 256 9.3% -> 8.0%, rank 1024 5.9% -> 3.7%;
full-rank factors (16384 tokens), rank 256 18.1% -> 15.9%, rank 1356 15.1% -> 12.3%. At a fixed memory it is
about even: 8 GiB of the whole 1B model's curvature admits rank 1815 with two passes or 3759 with one (restore
holds the factors or the bases, never both), 11.1% against 11.0% on the full-rank factors. The probe, trace and
row count are the first pass's (they do not depend on ``Omega``). A refined sketch adds, averages and all-reduces
only with sketches of the same ``Omega_2``, so a fit with two passes holds all of its data: no running mean over
further fits, no EMA.

What holds (tested in float64 against the dense factor): ``F_nys ⪯ F`` so ``sum(lam)`` never exceeds the true
top-k sum; the approximation is exact (``rest = 0``) when ``rank(F) <= k``, e.g. a factor fitted on fewer tokens
than ``rank`` (the token matrix is the factor's square root); given ``Q``, the probe's ``(d / p) ||P Z||_F^2`` is an
unbiased estimate of ``tr(F_rest^2)``, and ``rest`` is clamped to ``tr(F_rest)`` (the weighted mean is at most the
largest left-out eigenvalue). Otherwise the error is that of a rank-k
truncation plus the sketch's loss; it is measured, not bounded, by ``benchmarks/scale.py`` on the operator that
matters (the preconditioned safety gradient) against the dense factors.

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
        probes: columns of the independent probe that estimates the left-out part's energy-weighted mean
            eigenvalue (``rest``; module docstring), at ``d * probes`` floats per factor; 0 falls back to the plain
            mean. With 16 the 1B shape's error equalled the one with the exact value to 4 digits.
        passes: passes over the data per fit: 1 streams the sketch once; 2 adds one step of subspace iteration
            (module docstring): a more accurate basis for one more forward and backward and ``d * s`` more floats
            per factor. Only for fits that hold all their data (not with ``ema_decay`` or a running mean).
        mean_rest: ``rest`` as the plain mean over all ``d - k`` left-out directions (True) or as the
            energy-weighted mean (False; module docstring). None: the consumer's default, the energy-weighted mean
            for K-FAC / EK-FAC operators and restore (they precondition gradients), the plain mean for CurvSafe's
            projection (it damps updates, which meet every direction about alike; :mod:`.subspace`).
    """

    max_dense_dim: int = 2048
    rank: int = 256
    oversample: int = 128
    probes: int = 16
    passes: int = 1
    mean_rest: Optional[bool] = None

    def __post_init__(self):
        if (self.max_dense_dim < 1 or self.rank < 1 or self.oversample < 0 or self.probes < 0
                or self.passes not in (1, 2)):
            raise ValueError("LowRank needs max_dense_dim >= 1, rank >= 1, oversample >= 0, probes >= 0 and passes "
                             f"1 or 2; got {self}")

    def sketched(self, dim: int) -> bool:
        """Whether a factor of this dimension is sketched (and the sketch and probe are narrower than the factor)."""
        return dim > self.max_dense_dim and self.width + self.probes < dim

    @property
    def width(self) -> int:
        return self.rank + self.oversample


_TEST_MATRICES: dict[tuple, Tensor] = {}


def _test_matrix(dim: int, width: int, device: torch.device, salt: int) -> Tensor:
    key = (dim, width, str(device), salt)
    if key not in _TEST_MATRICES:
        gen = torch.Generator().manual_seed(1_000_003 * dim + width + 7_919 * salt)
        gauss = torch.randn(dim, width, generator=gen, dtype=torch.float64)
        _TEST_MATRICES[key] = torch.linalg.qr(gauss).Q.float().to(device)
    return _TEST_MATRICES[key]


def sketch_matrix(dim: int, width: int, device: torch.device) -> Tensor:
    """The shared orthonormal test matrix ``Omega`` (dim, width), float32, seeded by its shape only."""
    return _test_matrix(dim, width, device, salt=0)


def probe_matrix(dim: int, probes: int, device: torch.device) -> Tensor:
    """The shared orthonormal probe ``Psi`` (dim, probes), float32, drawn independently of ``Omega``."""
    return _test_matrix(dim, probes, device, salt=1)


class SketchedFactor:
    """A PSD factor held as ``Y = F Omega``, the probe ``Z = F Psi`` (or None), ``tr(F)`` and the number of rows
    summed into it (see the module docstring). ``omega``: the factor's own test matrix after a second pass (None:
    the shared one of its shape).

    Supports what K-FAC does with a dense factor: in-place row updates (``F += rows^T rows``), ``+``, scalar
    ``*`` and ``/`` (sums, means and EMAs; a scalar leaves the row count alone, a sum adds the counts),
    ``clone``, ``trace()``, and :meth:`tensors` for an in-place all-reduce.
    """

    def __init__(self, Y: Tensor, trace: Tensor, rows: Optional[Tensor] = None, Z: Optional[Tensor] = None,
                 omega: Optional[Tensor] = None):
        self.Y = Y
        self.Z = Z
        self._omega = omega
        self._trace = trace
        self._rows = rows if rows is not None else torch.zeros((), dtype=torch.float64, device=Y.device)

    @classmethod
    def zeros(cls, dim: int, width: int, device: torch.device, probes: int = 0) -> "SketchedFactor":
        zero = torch.zeros((), dtype=torch.float64, device=device)
        Z = torch.zeros(dim, probes, device=device) if probes else None
        return cls(torch.zeros(dim, width, device=device), zero, zero.clone(), Z)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.Y.shape[0], self.Y.shape[0]))

    @property
    def omega(self) -> Tensor:
        return self._omega if self._omega is not None else sketch_matrix(self.Y.shape[0], self.Y.shape[1],
                                                                         self.Y.device)

    @property
    def refined(self) -> bool:
        """Whether a second pass gave this factor its own test matrix."""
        return self._omega is not None

    def with_sketch(self, Y: Tensor, omega: Tensor) -> "SketchedFactor":
        """This factor with the second pass's sketch ``Y = F omega`` (same probe, trace and row count)."""
        return SketchedFactor(Y, self._trace, self._rows, self.Z, omega)

    @property
    def psi(self) -> Optional[Tensor]:
        return None if self.Z is None else probe_matrix(self.Z.shape[0], self.Z.shape[1], self.Z.device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.Y, self.Z, self._omega) if t is not None)

    @property
    def rank_bound(self) -> int:
        """``rank(F)`` is at most the number of rows summed into it (and ``d``; ``d`` when the count is unknown)."""
        rows = int(round(float(self._rows)))
        return min(self.Y.shape[0], rows) if rows > 0 else self.Y.shape[0]

    def add_rows(self, rows: Tensor) -> "SketchedFactor":
        """``F += rows^T rows`` for ``rows`` (n, d), in place."""
        rows = rows.float()
        self.Y.addmm_(rows.T, rows @ self.omega)
        if self.Z is not None:
            self.Z.addmm_(rows.T, rows @ self.psi)
        self._trace += rows.double().square().sum()
        self._rows += rows.shape[0]
        return self

    def trace(self) -> Tensor:
        return self._trace.float()

    def tensors(self) -> list[Tensor]:
        """The tensors that sum over data (for an in-place all-reduce; not the replicated test matrix)."""
        return [self.Y, self._trace, self._rows, *([] if self.Z is None else [self.Z])]

    def held(self) -> list[Tensor]:
        """Every tensor this factor holds: :meth:`tensors` and its own test matrix after a second pass."""
        return [*self.tensors(), *([] if self._omega is None else [self._omega])]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> "SketchedFactor":
        """A new sketch with ``fn`` applied to the sketch, probe and trace (a linear map of ``F``)."""
        return SketchedFactor(fn(self.Y), fn(self._trace), self._rows.clone(), None if self.Z is None else fn(self.Z),
                              self._omega)

    def clone(self) -> "SketchedFactor":
        return self._map(Tensor.clone)

    def _check(self, other: "SketchedFactor") -> None:
        if not isinstance(other, SketchedFactor) or other.Y.shape != self.Y.shape:
            raise TypeError("a sketched factor combines only with a sketch of the same shape")
        if (self._omega is None) != (other._omega is None) or (
                self._omega is not None and not torch.equal(self._omega, other._omega)):
            raise TypeError("a sketched factor combines only with a sketch of the same test matrix (a second pass "
                            "gives each factor its own)")

    def _probes_match(self, other: "SketchedFactor") -> bool:
        """Whether both have a probe (of the same shape); False when either has none (a sketch saved before probes
        existed: a sum with it keeps no probe, and its rest is the plain mean)."""
        if self.Z is None or other.Z is None:
            return False
        if other.Z.shape != self.Z.shape:
            raise TypeError("a sketched factor combines only with a sketch of the same shape")
        return True

    def __add__(self, other: "SketchedFactor") -> "SketchedFactor":
        self._check(other)
        return SketchedFactor(self.Y + other.Y, self._trace + other._trace, self._rows + other._rows,
                              self.Z + other.Z if self._probes_match(other) else None, self._omega)

    def add_(self, other: "SketchedFactor") -> "SketchedFactor":
        self._check(other)
        if self._probes_match(other):
            self.Z.add_(other.Z)
        else:
            self.Z = None
        self.Y.add_(other.Y)
        self._trace += other._trace
        self._rows += other._rows
        return self

    def __mul__(self, c: float) -> "SketchedFactor":
        return self._map(lambda t: t * c)

    __rmul__ = __mul__

    def __truediv__(self, c: float) -> "SketchedFactor":
        return self._map(lambda t: t / c)

    def __itruediv__(self, c: float) -> "SketchedFactor":
        for t in (self.Y, self.Z, self._trace):
            if t is not None:
                t /= c
        return self

    def state(self) -> dict:
        optional = {"probe": self.Z, "omega": self._omega}
        return {"sketch": self.Y, "trace": self._trace, "rows": self._rows,
                **{k: t for k, t in optional.items() if t is not None}}

    @classmethod
    def from_state(cls, state: dict, device: Optional[torch.device] = None) -> "SketchedFactor":
        def moved(t: Optional[Tensor]) -> Optional[Tensor]:
            return t if t is None or device is None else t.to(device)

        return cls(*(moved(state.get(k)) for k in ("sketch", "trace", "rows", "probe", "omega")))

    def eigen(self, rank: int, name: str = "factor", *, mean_rest: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """``(lam (k,), Q (d, k), rest)`` float32 (see the module docstring); ``k = min(rank, sketch width)``. With
        ``mean_rest``, ``rest`` is the plain mean over all ``d - k`` left-out directions, ``(tr(F) - sum(lam)) / (d -
        k)``, as for CurvSafe's projection of updates (:mod:`curvsafe.curvature.subspace` says why)."""
        if not all(bool(torch.isfinite(t).all()) for t in self.tensors()):
            raise FloatingPointError(f"factor {name} has non-finite entries; refusing to eigendecompose it")
        Y, omega = self.Y.double(), self.omega.double()
        d, s = Y.shape
        k = min(rank, s)
        if not bool(Y.any()):  # no curvature seen (e.g. a block the loss does not reach): all of it is the rest
            return (torch.zeros(k, device=Y.device), omega[:, :k].float().contiguous(),
                    torch.tensor(float(self._trace) / max(self.rank_bound - k, 1), device=Y.device))
        # the shift's scale needs no float64: |Y| in float32 (0.039 against 0.053 s for 8192 x 384 on a 2-core CPU)
        shift = float(torch.finfo(torch.float32).eps) * max(float(torch.linalg.matrix_norm(self.Y.float(), ord=2)),
                                                            1e-300)
        Y_shift = Y + shift * omega
        core = omega.T @ Y_shift
        chol = torch.linalg.cholesky(0.5 * (core + core.T) + 1e-12 * shift * torch.eye(s, dtype=Y.dtype,
                                                                                        device=Y.device))
        B = torch.linalg.solve_triangular(chol, Y_shift.T, upper=False).T  # Y_shift chol^{-T}
        # float32 suffices here (about twice as fast as float64 on CPU): its rounding, ~1e-7 of the largest
        # eigenvalue, is below the shift (float32 eps x |Y|, 1e-6 to 1e-5 of it) that the eigenvalues already carry
        U, sv, _ = torch.linalg.svd(B.float(), full_matrices=False)
        lam, Q = (sv[:k].double().square() - shift).clamp_min(0), U[:, :k].double()
        left_mass = max(float(self._trace) - float(lam.sum()), 0.0)  # tr(F_rest)
        if mean_rest:
            rest = left_mass / (d - k) if d > k else 0.0
        elif self.Z is not None and self.Z.shape[1] > 0:  # energy-weighted mean: tr(F_rest^2) / tr(F_rest)
            Z = self.Z.double()
            PZ = Z - Q @ (Q.T @ Z)
            # at most the largest left-out eigenvalue, so at most their sum (which also keeps rounding noise small)
            rest = min(float(PZ.square().sum()) * d / Z.shape[1] / left_mass, left_mass) if left_mass > 0 else 0.0
        else:  # plain mean over the nonzero eigenvalues the basis leaves out, at most r - k of them
            left = self.rank_bound - k
            rest = left_mass / left if left > 0 else 0.0
        return lam.float(), Q.float().contiguous(), torch.tensor(rest, device=Y.device)


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
