"""Robust symmetric eigendecomposition for Kronecker factors."""

from __future__ import annotations

import torch
from torch import Tensor


def safe_eigh(matrix: Tensor, name: str, *, retries: int = 4) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending, clamped at 0) and eigenvectors (columns) of a PSD factor, in float32.

    Computed in float64 on the symmetrised matrix. Non-finite entries raise ``FloatingPointError`` naming the
    factor (kronfluence's ``eigh`` of a NaN factor fails obscurely); if LAPACK does not converge, the decomposition
    is retried with a growing diagonal jitter (relative to the mean eigenvalue) that is subtracted again.
    """
    if not bool(torch.isfinite(matrix).all()):
        raise FloatingPointError(f"factor {name} has non-finite entries; refusing to eigendecompose it")
    m = matrix.double()
    m = 0.5 * (m + m.T)
    scale = float(m.diagonal().abs().mean()) or 1.0
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    for attempt in range(retries + 1):
        jitter = 0.0 if attempt == 0 else scale * 10.0 ** (attempt - 10)
        try:
            vals, vecs = torch.linalg.eigh(m + jitter * eye)
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            continue
        return (vals - jitter).clamp_min(0).float(), vecs.float()
    raise FloatingPointError(f"eigh of factor {name} did not converge after {retries} jittered retries")
