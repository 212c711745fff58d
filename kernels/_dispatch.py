"""The one backend table and the input checks shared by the four ops.

``backend=None`` picks Triton for CUDA tensors, the C++ extension for CPU tensors when it is built (or can be
JIT-compiled), else the PyTorch reference. ``"triton"``, ``"cpp"`` and ``"torch"`` force one; Triton on CPU
tensors needs ``TRITON_INTERPRET=1`` set before :mod:`curvsafe.kernels` is imported (whether Triton is there and
interpreting is read once, at import, by :mod:`._triton`). Each op registers its three implementations with
:func:`run` (same arguments, already checked), which picks one and calls it.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

from ._triton import HAS_TRITON, INTERPRET

BACKENDS = ("torch", "cpp", "triton")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64 is rounded to fp32


def choose_backend(backend: Optional[str], device: torch.device) -> str:
    """Resolve ``backend`` for tensors on ``device`` (see the module docstring)."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        if backend == "triton":
            if not HAS_TRITON:
                raise RuntimeError("backend='triton' needs the triton package")
            if device.type != "cuda" and not INTERPRET:
                raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before import")
        if backend == "cpp":
            if device.type != "cpu":
                raise RuntimeError("backend='cpp' runs on CPU tensors only")
            from ._cpp import load_extension

            if load_extension() is None:
                raise RuntimeError("backend='cpp' requested but the C++ extension is not available")
        return backend
    if device.type == "cuda" and HAS_TRITON:
        return "triton"
    if device.type == "cpu":
        from ._cpp import load_extension

        if load_extension() is not None:
            return "cpp"
    return "torch"


def run(implementations: Mapping[str, Callable], backend: Optional[str], device: torch.device, *args, **kwargs):
    """Call the implementation of the backend chosen for ``device`` (see :func:`choose_backend`)."""
    return implementations[choose_backend(backend, device)](*args, **kwargs)


def cpp_op(name: str) -> Callable:
    """The C++ extension's function ``name`` (call only after :func:`choose_backend` picked ``"cpp"``)."""
    from ._cpp import load_extension

    return getattr(load_extension(), name)


def fp32_contiguous(*tensors: Optional[Tensor]) -> list[Optional[Tensor]]:
    """The tensors as contiguous float32 (what the C++ kernels take); None stays None."""
    return [None if t is None else t.float().contiguous() for t in tensors]


def no_fp64(*tensors: Tensor) -> list[Tensor]:
    """float64 tensors rounded to float32 (the Triton kernels' widest input), the others as they are."""
    return [t.float() if t.dtype == torch.float64 else t for t in tensors]


def check_matrix(name: str, t: Tensor, *, rows: Optional[int] = None, cols: Optional[int] = None) -> None:
    if not isinstance(t, Tensor) or t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor, got {getattr(t, 'shape', type(t))}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp32, fp16, bf16; fp64 is rounded), got {t.dtype}")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} has {t.shape[0]} rows, expected {rows}")
    if cols is not None and t.shape[1] != cols:
        raise ValueError(f"{name} has {t.shape[1]} columns, expected {cols}")


def check_same_device(*tensors: Optional[Tensor]) -> torch.device:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return devices.pop()


def check_segments(segment_ids: Optional[Tensor], num_tokens: int) -> None:
    """``segment_ids`` must be (T,) integer, non-negative and non-decreasing."""
    if segment_ids is None:
        return
    if segment_ids.dim() != 1 or segment_ids.shape[0] != num_tokens:
        raise ValueError(f"segment_ids must have shape ({num_tokens},), got {tuple(segment_ids.shape)}")
    if segment_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"segment_ids must be int32 or int64, got {segment_ids.dtype}")
    if num_tokens and (segment_ids[0] < 0 or bool((segment_ids[1:] < segment_ids[:-1]).any())):
        raise ValueError("segment_ids must be non-negative and sorted (tokens of one example contiguous)")


def check_offsets(offsets: Optional[Tensor], num_tokens: int, segment_ids: Optional[Tensor]) -> None:
    """``offsets`` must be (N + 1,) integer, start at 0, end at ``num_tokens`` and never decrease; not given with
    ``segment_ids``. Its values are checked on CPU only: on a GPU that would wait for the device, which is what
    callers pass offsets to avoid (like flash-attention's ``cu_seqlens``, they are the caller's to get right)."""
    if offsets is None:
        return
    if segment_ids is not None:
        raise ValueError("give segment_ids or offsets, not both")
    if offsets.dim() != 1 or offsets.shape[0] < 1:
        raise ValueError(f"offsets must have shape (N + 1,) with N >= 0, got {tuple(offsets.shape)}")
    if offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"offsets must be int32 or int64, got {offsets.dtype}")
    if offsets.device.type == "cpu" and (int(offsets[0]) != 0 or int(offsets[-1]) != num_tokens
                                         or bool((offsets[1:] < offsets[:-1]).any())):
        raise ValueError(f"offsets must run from 0 to the {num_tokens} tokens without decreasing")


def segment_ids_of(offsets: Tensor, num_tokens: int) -> Tensor:
    """The segment id of each token of the ranges ``offsets`` (int64, on their device; no wait for it)."""
    offsets = offsets.long()
    ids = torch.arange(offsets.shape[0] - 1, device=offsets.device)
    return torch.repeat_interleave(ids, offsets.diff(), output_size=num_tokens)
