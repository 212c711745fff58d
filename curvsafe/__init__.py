"""curvsafe: curvature-aware safety restoration for fine-tuned LLMs."""

from ._version import __version__

__all__ = ["__version__"]
