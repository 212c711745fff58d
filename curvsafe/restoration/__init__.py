"""Curvature-aware safety restoration (the paper's method) and its baselines."""

from .api import Constraint, RestoreResult, StopReason, restore, trainable_params
from .baselines import BASELINES, resta, revert, safelora
from .preconditioners import METHODS
from .run import NoProgressError, RestoreRun, run_restore

__all__ = ["restore", "Constraint", "RestoreResult", "StopReason", "trainable_params", "METHODS", "BASELINES",
           "revert", "safelora", "resta",
           "run_restore", "RestoreRun", "NoProgressError"]
