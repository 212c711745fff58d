"""Triton plumbing shared by the ops: availability, interpreter mode, autotuning, and one tiled GEMM.

Kernels are defined at import, so ``TRITON_INTERPRET=1`` must be set before :mod:`curvsafe.kernels` is imported
to run them on CPU tensors. In the interpreter: no ``@triton.autotune`` (it rejects several configs; one fixed
config of blocks >= 32 is passed instead), and fp16/bf16 tiles are upcast to fp32 after loading (its bf16
arithmetic is wrong). On the GPU, fp16/bf16 tiles go to the tensor cores as they are and fp32 ``tl.dot`` uses
TF32, accumulating in fp32 either way.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the package works without triton (CPU: C++ or reference path)
    triton = tl = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Autotune on the GPU unless CURVSAFE_TRITON_AUTOTUNE=0 (tests: one fixed small config per kernel, no tuning runs).
TUNE = not INTERPRET and os.environ.get("CURVSAFE_TRITON_AUTOTUNE", "1") != "0"

# One small fixed config when not tuning (the interpreter's cost grows with programs x loop steps).
FIXED_GEMM_META = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def upcast_tiles(*tensors: Tensor) -> bool:
    """Whether kernels must upcast loaded tiles to fp32 (the interpreter, for half-precision inputs)."""
    return INTERPRET and any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors)


def autotune(configs, key, **kwargs):
    """``triton.autotune`` when tuning; else the bare kernel (meta-parameters passed explicitly).
    ``kwargs`` go to ``triton.autotune`` (``restore_value`` for kernels that update a buffer in place)."""
    def wrap(fn):
        return triton.autotune(configs=configs, key=key, **kwargs)(fn) if TUNE else fn

    return wrap


def gemm_configs():
    if not TUNE or not HAS_TRITON:
        return []
    cfg = triton.Config
    return [
        cfg({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=4),
    ]


if HAS_TRITON:

    @autotune(configs=gemm_configs(), key=["M", "N", "K", "HAS_SCALE", "HAS_KSCALE", "SQUARE"])
    @triton.jit
    def _gemm_kernel(a_ptr, b_ptr, c_ptr, scale_ptr, kscale_ptr, M, N, K,
                     stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_sm, stride_sn,
                     HAS_SCALE: tl.constexpr, HAS_KSCALE: tl.constexpr, SQUARE: tl.constexpr,
                     UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):
        """C = (sq(A) diag(kscale)) @ sq(B) [* scale], fp32 accumulation; sq squares (in fp32) when SQUARE."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % size_m
        pid_n = (pid % group) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                        mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
            if UPCAST or SQUARE or HAS_KSCALE:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if SQUARE:
                a = a * a
                b = b * b
            if HAS_KSCALE:
                ks = tl.load(kscale_ptr + kk, mask=kk < K, other=0.0)
                a = a * ks[None, :]
            acc += tl.dot(a, b)
        mask_c = (rm[:, None] < M) & (rn[None, :] < N)
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + rm[:, None] * stride_sm + rn[None, :] * stride_sn, mask=mask_c,
                                other=0.0)
        tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc, mask=mask_c)


def gemm(a: Tensor, b: Tensor, *, scale: Tensor | None = None, kscale: Tensor | None = None,
         square: bool = False) -> Tensor:
    """fp32 ``(a diag(kscale)) @ b`` (operands squared first when ``square``), times ``scale`` elementwise.

    ``a`` (M, K) and ``b`` (K, N) may be any strided views (transposes cost nothing); ``scale`` is (M, N),
    ``kscale`` (K,) fp32. The elementwise ``scale`` is applied in the GEMM epilogue.
    """
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=torch.float32, device=a.device)
    dummy = c
    s = scale if scale is not None else dummy
    ks = kscale.float().contiguous() if kscale is not None else dummy
    meta = {} if TUNE else FIXED_GEMM_META

    def grid(META):
        return (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)

    _gemm_kernel[grid](a, b, c, s, ks, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                       c.stride(0), c.stride(1), s.stride(0), s.stride(1),
                       HAS_SCALE=scale is not None, HAS_KSCALE=kscale is not None, SQUARE=square,
                       UPCAST=upcast_tiles(a, b) or a.dtype != b.dtype, **meta)  # tl.dot needs one dtype
    return c
