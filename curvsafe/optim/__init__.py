"""Optimizers: :class:`CurvSafe`, a wrapper that applies a curvature-aware safety projection to every update, and
the trainers that build it around the HF Trainer's own optimizer (:mod:`curvsafe.optim.trainer`)."""

from .curvsafe import CurvSafe
from .settings import CurvSafeSettings
from .trainer import CurvSafeLogMixin, CurvSafeTrainerMixin

__all__ = ["CurvSafe", "CurvSafeLogMixin", "CurvSafeSettings", "CurvSafeTrainer", "CurvSafeTrainerMixin"]


def __getattr__(name: str):
    if name == "CurvSafeTrainer":
        from . import trainer

        return trainer.CurvSafeTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
