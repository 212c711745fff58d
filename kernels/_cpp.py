"""Loader for the C++ CPU kernels (``csrc/``).

The extension ``curvsafe.kernels._C`` is normally compiled by ``setup.py`` (torch.utils.cpp_extension, ninja).
When it is missing but the sources are present (a source checkout), it is JIT-compiled on first use into torch's
extension cache. When neither works (no compiler, ``CURVSAFE_NO_CPP=1``), the package stays on the PyTorch
reference path and says so once.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("curvsafe_kernels.cpp",)


@functools.lru_cache(maxsize=None)
def load_extension():
    """The compiled extension module, or ``None`` (after one warning) when it cannot be had."""
    if os.environ.get("CURVSAFE_NO_CPP") == "1":
        return None
    try:
        from . import _C  # type: ignore[attr-defined]

        return _C
    except ImportError:
        pass
    sources = [CSRC / s for s in SOURCES]
    if not all(s.exists() for s in sources):
        warnings.warn("curvsafe: C++ kernels not built and csrc/ not found; using the PyTorch reference path",
                      RuntimeWarning, stacklevel=3)
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(name="curvsafe_kernels_jit", sources=[str(s) for s in sources],
                    extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # compiler missing or failing: the reference path still works
        warnings.warn(f"curvsafe: could not JIT-compile the C++ kernels ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}); using the PyTorch reference path",
                      RuntimeWarning, stacklevel=3)
        return None
