"""Optimizers: :class:`CurvSafe`, a wrapper that applies a curvature-aware safety projection to every update."""

from .curvsafe import CurvSafe
from .settings import CurvSafeSettings

__all__ = ["CurvSafe", "CurvSafeSettings"]
