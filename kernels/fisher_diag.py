"""Op 3: ``linear_fisher_diag`` -- diagonal empirical Fisher of one linear layer from per-example gradients."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from ._dispatch import (check_matrix, check_offsets, check_same_device, check_segments, cpp_op, fp32_contiguous,
                        no_fp64, run, segment_ids_of)
from ._triton import HAS_TRITON, TUNE, autotune, gemm, tl, triton, upcast_tiles

if HAS_TRITON:

    def _configs():
        if not TUNE:
            return []
        cfg = triton.Config
        return [cfg({"BLOCK_O": 64, "BLOCK_I": 64, "BLOCK_T": 32}, num_stages=3, num_warps=4),
                cfg({"BLOCK_O": 128, "BLOCK_I": 64, "BLOCK_T": 32}, num_stages=3, num_warps=8),
                cfg({"BLOCK_O": 64, "BLOCK_I": 64, "BLOCK_T": 16}, num_stages=3, num_warps=4)]

    @autotune(configs=_configs(), key=["D_OUT", "D_IN", "N_SEG"])
    @triton.jit
    def _fisher_diag_kernel(x_ptr, gy_ptr, bounds_ptr, out_ptr, N_SEG, D_OUT, D_IN, stride_xt, stride_xi,
                            stride_gt, stride_go, UPCAST: tl.constexpr, BLOCK_O: tl.constexpr,
                            BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr):
        """One program per (BLOCK_O, BLOCK_I) output tile: for each example, its gradient tile
        ``sum_t gy_t x_t^T`` is formed in registers, squared and accumulated; nothing per example reaches memory."""
        ro = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        ri = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        rt = tl.arange(0, BLOCK_T)
        total = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for n in range(0, N_SEG):
            start = tl.load(bounds_ptr + n)
            end = tl.load(bounds_ptr + n + 1)
            g = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
            for t0 in range(start, end, BLOCK_T):
                tt = t0 + rt
                gy = tl.load(gy_ptr + tt[None, :] * stride_gt + ro[:, None] * stride_go,
                             mask=(tt[None, :] < end) & (ro[:, None] < D_OUT), other=0.0)
                x = tl.load(x_ptr + tt[:, None] * stride_xt + ri[None, :] * stride_xi,
                            mask=(tt[:, None] < end) & (ri[None, :] < D_IN), other=0.0)
                if UPCAST:
                    gy = gy.to(tl.float32)
                    x = x.to(tl.float32)
                g += tl.dot(gy, x.to(gy.dtype))
            total += g * g
        tl.store(out_ptr + ro[:, None] * D_IN + ri[None, :], total, mask=(ro[:, None] < D_OUT) & (ri[None, :] < D_IN))


def _fisher_diag_triton(x: Tensor, gy: Tensor, segment_ids: Optional[Tensor], offsets: Optional[Tensor]) -> Tensor:
    if segment_ids is None and offsets is None:  # every token is an example: (gy^2)^T (x^2), fp32 squares in the GEMM
        return gemm(gy.T, x, square=True)
    T, d_in = x.shape
    d_out = gy.shape[1]
    if offsets is None:  # the segments' bounds (waits for the device: unique_consecutive's output size)
        _, counts = torch.unique_consecutive(segment_ids, return_counts=True)
        bounds = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=x.device)
        bounds[1:] = torch.cumsum(counts, 0)
    else:  # empty ranges add nothing
        bounds = offsets.to(torch.int32)
    out = torch.empty((d_out, d_in), dtype=torch.float32, device=x.device)
    meta = {"BLOCK_O": 32, "BLOCK_I": 32, "BLOCK_T": 32} if not TUNE else {}

    def grid(META):
        return (triton.cdiv(d_out, META["BLOCK_O"]), triton.cdiv(d_in, META["BLOCK_I"]))

    _fisher_diag_kernel[grid](x, gy, bounds, out, bounds.numel() - 1, d_out, d_in, x.stride(0), x.stride(1),
                              gy.stride(0), gy.stride(1), UPCAST=upcast_tiles(x, gy), **meta)
    return out


def linear_fisher_diag(x: Tensor, gy: Tensor, *, segment_ids: Optional[Tensor] = None,
                       offsets: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """Return ``sum_n g_n * g_n`` (d_out, d_in) fp32 with ``g_n = sum_{t in segment n} gy_t x_t^T``.

    Per-example gradients are never all materialised. The examples are the segments of ``segment_ids`` (sorted,
    (T,)), or the token ranges ``offsets[n]:offsets[n + 1]`` ((N + 1,), from 0 to T; empty ranges allowed) for
    callers that know them: no wait for the device to find or check the segments (:func:`._dispatch.check_offsets`).
    Neither makes each token its own example.
    """
    check_matrix("x", x)
    check_matrix("gy", gy, rows=x.shape[0])
    check_segments(segment_ids, x.shape[0])
    check_offsets(offsets, x.shape[0], segment_ids)
    return run(_IMPLEMENTATIONS, backend, check_same_device(x, gy, segment_ids, offsets), x, gy, segment_ids, offsets)


_IMPLEMENTATIONS = {
    "torch": lambda x, gy, seg, offsets: reference.linear_fisher_diag(x, gy, segment_ids=seg, offsets=offsets),
    "cpp": lambda x, gy, seg, offsets: cpp_op("linear_fisher_diag")(
        *fp32_contiguous(x, gy), segment_ids_of(offsets, x.shape[0]) if offsets is not None
        else None if seg is None else seg.long().contiguous()),
    "triton": lambda x, gy, seg, offsets: _fisher_diag_triton(*no_fp64(x, gy), seg, offsets),
}
