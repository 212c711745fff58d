"""Backend selection and input checks shared by the four ops.

``backend=None`` picks Triton for CUDA tensors, the C++ extension for CPU tensors when it is built (or can be
JIT-compiled), else the PyTorch reference. ``"triton"``, ``"cpp"`` and ``"torch"`` force one; Triton on CPU
tensors needs ``TRITON_INTERPRET=1`` set before :mod:`curvsafe.kernels` is imported.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor

BACKENDS = ("torch", "cpp", "triton")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64 is rounded to fp32


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose_backend(backend: Optional[str], device: torch.device) -> str:
    """Resolve ``backend`` for tensors on ``device`` (see the module docstring)."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        if backend == "triton":
            if not triton_available():
                raise RuntimeError("backend='triton' needs the triton package")
            if device.type != "cuda" and not interpreting():
                raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before import")
        if backend == "cpp":
            if device.type != "cpu":
                raise RuntimeError("backend='cpp' runs on CPU tensors only")
            from ._cpp import load_extension

            if load_extension() is None:
                raise RuntimeError("backend='cpp' requested but the C++ extension is not available")
        return backend
    if device.type == "cuda" and triton_available():
        return "triton"
    if device.type == "cpu":
        from ._cpp import load_extension

        if load_extension() is not None:
            return "cpp"
    return "torch"


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
