"""Optimizers: :class:`CurvSafe`, a wrapper that applies a curvature-aware safety projection to every update."""

from .curvsafe import CurvSafe

__all__ = ["CurvSafe"]
