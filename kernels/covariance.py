"""Op 1: ``covariance_update`` -- the K-FAC factor update ``beta * out + alpha * x^T diag(mask) x``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from ._dispatch import check_matrix, check_same_device, choose_backend


def covariance_update(x: Tensor, out: Optional[Tensor] = None, *, mask: Optional[Tensor] = None,
                      alpha: float = 1.0, beta: float = 0.0, backend: Optional[str] = None) -> Tensor:
    """Return ``beta * out + alpha * x^T diag(mask) x``, a symmetric (d, d) fp32 matrix.

    Args:
        x: (T, d) fp32/fp16/bf16 rows (tokens). Non-contiguous inputs are fine.
        out: optional (d, d) fp32 accumulator, updated in place and returned (the EMA / running-sum form).
            Without it, ``beta`` is ignored and a new matrix is returned.
        mask: optional (T,) weights (bool or float); 0 drops a token.
        backend: ``None`` (auto), ``"torch"``, ``"cpp"`` or ``"triton"``.
    """
    check_matrix("x", x)
    d = x.shape[1]
    if out is not None and (out.shape != (d, d) or out.dtype != torch.float32):
        raise ValueError(f"out must be a ({d}, {d}) float32 tensor, got {tuple(out.shape)} {out.dtype}")
    if mask is not None and (mask.dim() != 1 or mask.shape[0] != x.shape[0]):
        raise ValueError(f"mask must have shape ({x.shape[0]},), got {tuple(mask.shape)}")
    device = check_same_device(x, out, mask)
    chosen = choose_backend(backend, device)
    if chosen == "cpp":
        from ._cpp import load_extension

        m = None if mask is None else mask.float().contiguous()
        result = load_extension().covariance_update(x.float().contiguous(), m, float(alpha))
        return result if out is None else out.mul_(beta).add_(result)
    return reference.covariance_update(x, out, mask=mask, alpha=alpha, beta=beta)
