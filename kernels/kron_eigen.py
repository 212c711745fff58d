"""Op 4: ``kron_eigen_apply`` -- a matrix through a scaled Kronecker eigenbasis (EK-FAC inverse, projections)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from ._dispatch import check_matrix, check_same_device, cpp_op, fp32_contiguous, no_fp64, run
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
    EK-FAC inverse, a 0/1 or damping mask gives a projection. With a leading batch dimension on all four operands
    (``V`` (B, d_out, d_in), ``QA`` (B, d_in, d_in), ...) every matrix of the batch is transformed by its own bases
    in one call (many small blocks at once: one batched GEMM per product on the C++/torch paths).
    """
    if isinstance(V, Tensor) and V.dim() == 3:
        return _kron_eigen_batched(V, QA, QG, scale, backend)
    check_matrix("V", V)
    d_out, d_in = V.shape
    check_matrix("QA", QA, rows=d_in, cols=d_in)
    check_matrix("QG", QG, rows=d_out, cols=d_out)
    check_matrix("scale", scale, rows=d_out, cols=d_in)
    return run(_IMPLEMENTATIONS, backend, check_same_device(V, QA, QG, scale), V, QA, QG, scale)


def _kron_eigen_batched(V: Tensor, QA: Tensor, QG: Tensor, scale: Tensor, backend: Optional[str]) -> Tensor:
    batch = V.shape[0]
    for name, t in (("QA", QA), ("QG", QG), ("scale", scale)):
        if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[0] != batch:
            raise ValueError(f"with a batched V {tuple(V.shape)}, {name} must be 3-D with {batch} matrices, got "
                             f"{tuple(getattr(t, 'shape', ()))}")
    d_out, d_in = V.shape[1:]
    check_matrix("V[0]", V[0])
    check_matrix("QA[0]", QA[0], rows=d_in, cols=d_in)
    check_matrix("QG[0]", QG[0], rows=d_out, cols=d_out)
    check_matrix("scale[0]", scale[0], rows=d_out, cols=d_in)
    return run(_IMPLEMENTATIONS, backend, check_same_device(V, QA, QG, scale), V, QA, QG, scale)


def _kron_eigen_triton_any(V: Tensor, QA: Tensor, QG: Tensor, scale: Tensor) -> Tensor:
    if V.dim() == 3:  # the tiled GEMMs take one matrix: one chain per batch entry
        return torch.stack([_kron_eigen_triton_any(*t) for t in zip(V, QA, QG, scale)])
    return _kron_eigen_triton(*no_fp64(V, QA, QG, scale))


# the same three for one matrix and for a batch (the C++ kernel and the reference take either)
_IMPLEMENTATIONS = {
    "torch": reference.kron_eigen_apply,
    "cpp": lambda V, QA, QG, scale: cpp_op("kron_eigen_apply")(*fp32_contiguous(V, QA, QG, scale)),
    "triton": _kron_eigen_triton_any,
}
