"""curvsafe: curvature-aware safety restoration for fine-tuned LLMs.

``curvsafe.restore(model, safety, task, method=...)`` is :func:`curvsafe.restoration.restore` (imported lazily so
that ``curvsafe --version`` stays instant).
"""

from ._version import __version__

__all__ = ["__version__", "restore", "RestoreResult"]


def __getattr__(name):
    if name in ("restore", "RestoreResult"):
        from . import restoration

        return getattr(restoration, name)
    raise AttributeError(f"module 'curvsafe' has no attribute {name!r}")
