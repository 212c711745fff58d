"""Op 1: ``covariance_update`` -- the K-FAC factor update ``beta * out + alpha * x^T diag(mask) x``.

With ``lower_only`` the kernels skip mirroring the lower triangle onto the upper one (a pass over the whole
(d, d) matrix per call); a caller that accumulates many updates calls :func:`mirror_lower_` once at the end.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from ._dispatch import check_matrix, check_same_device, cpp_op, fp32_contiguous, no_fp64, run
from ._triton import HAS_TRITON, TUNE, autotune, tl, triton, upcast_tiles

if HAS_TRITON:

    def _configs():
        if not TUNE:
            return []
        cfg = triton.Config
        return [cfg({"BLOCK_D": 128, "BLOCK_T": 64}, num_stages=3, num_warps=8),
                cfg({"BLOCK_D": 128, "BLOCK_T": 32}, num_stages=4, num_warps=4),
                cfg({"BLOCK_D": 64, "BLOCK_T": 64}, num_stages=4, num_warps=4)]

    # the kernel updates `out` in place (EMA): autotuning's trial runs must not compound on it
    @autotune(configs=_configs(), key=["T", "D", "HAS_MASK", "HAS_OUT"], restore_value=["out_ptr"])
    @triton.jit
    def _covariance_kernel(x_ptr, mask_ptr, out_ptr, T, D, stride_xt, stride_xd, alpha, beta,
                           HAS_MASK: tl.constexpr, HAS_OUT: tl.constexpr, UPCAST: tl.constexpr, MIRROR: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
        """One program per tile (i, j) with i >= j of the (D, D) result: ``alpha * X_i^T diag(m) X_j`` (+ beta * out),
        stored at (i, j) on and below the diagonal and (``MIRROR``) mirrored above it, so the result is exactly
        symmetric."""
        pid = tl.program_id(0)
        # pid -> (i, j), i >= j, in row-major order of the lower triangle of tiles
        i = ((tl.sqrt(8.0 * pid + 1.0) - 1.0) * 0.5).to(tl.int32)
        i = tl.where((i + 1) * (i + 2) // 2 <= pid, i + 1, i)
        i = tl.where(i * (i + 1) // 2 > pid, i - 1, i)
        j = pid - i * (i + 1) // 2
        rows = i * BLOCK_D + tl.arange(0, BLOCK_D)
        cols = j * BLOCK_D + tl.arange(0, BLOCK_D)
        rt = tl.arange(0, BLOCK_T)
        acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            tt = t0 + rt
            in_t = tt < T
            xi = tl.load(x_ptr + tt[:, None] * stride_xt + rows[None, :] * stride_xd,
                         mask=in_t[:, None] & (rows[None, :] < D), other=0.0)
            xj = tl.load(x_ptr + tt[:, None] * stride_xt + cols[None, :] * stride_xd,
                         mask=in_t[:, None] & (cols[None, :] < D), other=0.0)
            if UPCAST:
                xi = xi.to(tl.float32)
                xj = xj.to(tl.float32)
            if HAS_MASK:
                m = tl.load(mask_ptr + tt, mask=in_t, other=0.0)
                xi = (xi * m[:, None]).to(xj.dtype)
            acc += tl.dot(tl.trans(xi), xj)
        acc = acc * alpha
        r = rows[:, None]
        c = cols[None, :]
        lower = (r < D) & (c < D) & (r >= c)
        if HAS_OUT:
            acc += beta * tl.load(out_ptr + r * D + c, mask=lower, other=0.0)
        tl.store(out_ptr + r * D + c, acc, mask=lower)
        if MIRROR:
            tl.store(out_ptr + c * D + r, acc, mask=lower & (r > c))


def _covariance_triton(x: Tensor, out: Optional[Tensor], mask: Optional[Tensor], alpha: float,
                       beta: float, lower_only: bool) -> Tensor:
    T, D = x.shape
    target = out if out is not None and out.is_contiguous() else torch.empty((D, D), dtype=torch.float32,
                                                                              device=x.device)
    if out is not None and target is not out:
        target.copy_(out)
    m = mask.float().contiguous() if mask is not None else target
    meta = {"BLOCK_D": 32, "BLOCK_T": 32} if not TUNE else {}

    def grid(META):
        n = triton.cdiv(D, META["BLOCK_D"])
        return (n * (n + 1) // 2,)

    _covariance_kernel[grid](x, m, target, T, D, x.stride(0), x.stride(1), float(alpha), float(beta),
                             HAS_MASK=mask is not None, HAS_OUT=out is not None, UPCAST=upcast_tiles(x),
                             MIRROR=not lower_only, **meta)
    if out is not None and target is not out:
        out.copy_(target)
        return out
    return target


def covariance_update(x: Tensor, out: Optional[Tensor] = None, *, mask: Optional[Tensor] = None,
                      alpha: float = 1.0, beta: float = 0.0, lower_only: bool = False,
                      backend: Optional[str] = None) -> Tensor:
    """Return ``beta * out + alpha * x^T diag(mask) x``, a symmetric (d, d) fp32 matrix.

    Args:
        x: (T, d) fp32/fp16/bf16 rows (tokens). Non-contiguous inputs are fine.
        out: optional (d, d) fp32 symmetric accumulator, updated in place and returned (the EMA / running-sum
            form; the Triton kernel reads its lower triangle). Without it, ``beta`` is ignored and a new matrix
            is returned.
        mask: optional (T,) weights (bool or float); 0 drops a token.
        lower_only: only the lower triangle (diagonal included) of the result is right; the upper one holds
            unspecified values until :func:`mirror_lower_`. For accumulating many updates into ``out``: each one
            then reads and writes only the lower triangle of ``out`` (the ``torch`` backend computes everything).
        backend: ``None`` (auto), ``"torch"``, ``"cpp"`` or ``"triton"``.
    """
    check_matrix("x", x)
    d = x.shape[1]
    if out is not None and (out.shape != (d, d) or out.dtype != torch.float32):
        raise ValueError(f"out must be a ({d}, {d}) float32 tensor, got {tuple(out.shape)} {out.dtype}")
    if mask is not None and (mask.dim() != 1 or mask.shape[0] != x.shape[0]):
        raise ValueError(f"mask must have shape ({x.shape[0]},), got {tuple(mask.shape)}")
    return run(_IMPLEMENTATIONS, backend, check_same_device(x, out, mask), x, out, mask, alpha, beta, lower_only)


def mirror_lower_(m: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Copy the strict lower triangle of the square fp32 ``m`` onto its upper one, in place (returns ``m``): the
    symmetric matrix that ``lower_only`` updates accumulated."""
    check_matrix("m", m)
    if m.shape[0] != m.shape[1] or m.dtype != torch.float32:
        raise ValueError(f"m must be a square float32 matrix, got {tuple(m.shape)} {m.dtype}")
    return run(_MIRROR_IMPLEMENTATIONS, backend, m.device, m)


def _covariance_cpp(x: Tensor, out: Optional[Tensor], mask: Optional[Tensor], alpha: float, beta: float,
                    lower_only: bool) -> Tensor:
    x, mask = fp32_contiguous(x, mask)
    if out is None or out.is_contiguous():  # accumulated in place
        return cpp_op("covariance_update")(x, mask, out, float(alpha), float(beta), lower_only)
    return out.mul_(beta).add_(cpp_op("covariance_update")(x, mask, None, float(alpha), 0.0, False))


def _mirror_cpp(m: Tensor) -> Tensor:
    if not m.is_contiguous():
        return reference.mirror_lower_(m)
    cpp_op("mirror_lower")(m)
    return m


_IMPLEMENTATIONS = {
    "torch": lambda x, out, mask, alpha, beta, lower_only: reference.covariance_update(x, out, mask=mask, alpha=alpha,
                                                                                       beta=beta),
    "cpp": _covariance_cpp,
    "triton": lambda x, out, mask, alpha, beta, lower_only: _covariance_triton(*no_fp64(x), out, mask, alpha, beta,
                                                                               lower_only),
}
_MIRROR_IMPLEMENTATIONS = {"torch": reference.mirror_lower_, "cpp": _mirror_cpp, "triton": reference.mirror_lower_}
