"""Op 4: ``kron_eigen_apply`` -- a matrix through a scaled Kronecker eigenbasis (EK-FAC inverse, projections)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from ._dispatch import check_matrix, check_same_device, choose_backend
from ._triton import gemm


def _kron_eigen_triton(V: Tensor, QA: Tensor, QG: Tensor, scale: Tensor) -> Tensor:
    """Four tiled GEMMs on strided views (no transposed copies); the eigenvalue scale is applied in the epilogue
    of the second, so the rotated matrix is written once, already scaled."""
    rotated = gemm(gemm(QG.T, V), QA, scale=scale.float())
    return gemm(gemm(QG, rotated), QA.T)


def kron_eigen_apply(V: Tensor, QA: Tensor, QG: Tensor, scale: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Return ``QG @ ((QG^T V QA) * scale) @ QA^T`` (d_out, d_in) fp32.

    ``QA`` (d_in, d_in) and ``QG`` (d_out, d_out) are orthogonal eigenbases (columns are eigenvectors) and
    ``scale`` (d_out, d_in) multiplies each Kronecker eigen-direction: ``1 / (lambda + damping)`` gives the
    EK-FAC inverse, a 0/1 or damping mask gives a projection.
    """
    check_matrix("V", V)
    d_out, d_in = V.shape
    check_matrix("QA", QA, rows=d_in, cols=d_in)
    check_matrix("QG", QG, rows=d_out, cols=d_out)
    check_matrix("scale", scale, rows=d_out, cols=d_in)
    device = check_same_device(V, QA, QG, scale)
    chosen = choose_backend(backend, device)
    if chosen == "cpp":
        from ._cpp import load_extension

        return load_extension().kron_eigen_apply(V.float().contiguous(), QA.float().contiguous(),
                                                 QG.float().contiguous(), scale.float().contiguous())
    if chosen == "triton":
        return _kron_eigen_triton(*(t.float() if t.dtype == torch.float64 else t for t in (V, QA, QG, scale)))
    return reference.kron_eigen_apply(V, QA, QG, scale)
