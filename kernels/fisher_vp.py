"""Op 2: ``linear_fisher_vp`` -- exact empirical-Fisher-vector product of one linear layer."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from ._dispatch import (check_matrix, check_offsets, check_same_device, check_segments, cpp_op, fp32_contiguous,
                        no_fp64, run, segment_ids_of)
from ._triton import HAS_TRITON, TUNE, autotune, gemm, gemm_configs, tl, triton, upcast_tiles

if HAS_TRITON:

    @autotune(configs=gemm_configs(), key=["T", "D_OUT", "D_IN"])
    @triton.jit
    def _token_scores_kernel(x_ptr, gy_ptr, v_ptr, part_ptr, T, D_OUT, D_IN, stride_xt, stride_xi, stride_gt,
                             stride_go, stride_vo, stride_vi, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """part[t, pid_n] = sum over this program's outputs o of gy[t, o] * (V x_t)[o]; the (T, D_OUT) product
        ``x V^T`` lives only in registers, tile by tile."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rt = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        ro = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D_IN, BLOCK_K):
            kk = k0 + rk
            x = tl.load(x_ptr + rt[:, None] * stride_xt + kk[None, :] * stride_xi,
                        mask=(rt[:, None] < T) & (kk[None, :] < D_IN), other=0.0)
            v = tl.load(v_ptr + ro[None, :] * stride_vo + kk[:, None] * stride_vi,
                        mask=(ro[None, :] < D_OUT) & (kk[:, None] < D_IN), other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                v = v.to(tl.float32)
            acc += tl.dot(x, v.to(x.dtype))
        gy = tl.load(gy_ptr + rt[:, None] * stride_gt + ro[None, :] * stride_go,
                     mask=(rt[:, None] < T) & (ro[None, :] < D_OUT), other=0.0).to(tl.float32)
        tl.store(part_ptr + rt * tl.num_programs(1) + pid_n, tl.sum(acc * gy, axis=1), mask=rt < T)


def _fisher_vp_triton(x: Tensor, gy: Tensor, V: Tensor, segment_ids: Optional[Tensor],
                      num_segments: Optional[int]) -> Tensor:
    """Scores ``s_t = gy_t . (V x_t)`` (fused GEMM + row reduction), segment sums, then ``gy^T diag(c) x`` with
    the per-token scale applied to the GEMM operand inside the kernel."""
    T, d_in = x.shape
    d_out = gy.shape[1]
    meta = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1} if not TUNE else {}
    n_blocks = {}

    def grid(META):
        n_blocks["n"] = triton.cdiv(d_out, META["BLOCK_N"])
        return (triton.cdiv(T, META["BLOCK_M"]), n_blocks["n"])

    # the buffer is sized for the smallest BLOCK_N any config uses (32), so every config fits
    part = torch.zeros((T, triton.cdiv(d_out, 32)), dtype=torch.float32, device=x.device)
    _token_scores_kernel[grid](x, gy, V, part, T, d_out, d_in, x.stride(0), x.stride(1), gy.stride(0),
                               gy.stride(1), V.stride(0), V.stride(1), UPCAST=upcast_tiles(x, gy, V), **meta)
    scores = part.view(-1)[: T * n_blocks["n"]].view(T, n_blocks["n"]).sum(dim=1)
    c = reference.segment_sums(scores, segment_ids, num_segments)
    return gemm(gy.T, x, kscale=c)


def linear_fisher_vp(x: Tensor, gy: Tensor, V: Tensor, *, segment_ids: Optional[Tensor] = None,
                     num_segments: Optional[int] = None, offsets: Optional[Tensor] = None,
                     backend: Optional[str] = None) -> Tensor:
    """Return ``sum_n g_n <g_n, V>`` (d_out, d_in) fp32 with ``g_n = sum_{t in segment n} gy_t x_t^T``.

    Never materialises per-example gradients: ``s_t = gy_t . (V x_t)``, segment sums ``c_n``, then
    ``gy^T diag(c_{n(t)}) x``. The examples are the segments of ``segment_ids`` (``num_segments``: more than the
    largest id, when known), or the token ranges ``offsets[n]:offsets[n + 1]`` (as for
    :func:`~.fisher_diag.linear_fisher_diag`: no wait for the device); neither makes each token its own example.
    """
    check_matrix("x", x)
    check_matrix("gy", gy, rows=x.shape[0])
    check_matrix("V", V, rows=gy.shape[1], cols=x.shape[1])
    check_segments(segment_ids, x.shape[0])
    check_offsets(offsets, x.shape[0], segment_ids)
    if offsets is not None:
        if num_segments is not None:
            raise ValueError("num_segments comes with segment_ids; offsets give their own count")
        segment_ids, num_segments = segment_ids_of(offsets, x.shape[0]), offsets.shape[0] - 1
    return run(_IMPLEMENTATIONS, backend, check_same_device(x, gy, V, segment_ids), x, gy, V, segment_ids,
               num_segments)


def _fisher_vp_cpp(x: Tensor, gy: Tensor, V: Tensor, segment_ids: Optional[Tensor],
                   num_segments: Optional[int]) -> Tensor:
    seg = None if segment_ids is None else segment_ids.long().contiguous()
    return cpp_op("linear_fisher_vp")(*fp32_contiguous(x, gy, V), seg, -1 if num_segments is None else num_segments)


_IMPLEMENTATIONS = {
    "torch": lambda x, gy, V, seg, n: reference.linear_fisher_vp(x, gy, V, segment_ids=seg, num_segments=n),
    "cpp": _fisher_vp_cpp,
    "triton": lambda x, gy, V, seg, n: _fisher_vp_triton(*no_fp64(x, gy, V), seg, n),
}
