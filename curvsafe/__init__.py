"""curvsafe: curvature-aware safety restoration for fine-tuned LLMs.

The public API, imported lazily (so that ``curvsafe --version`` stays instant):

- ``curvsafe.restore(model, safety, task, method=...)``, ``RestoreResult``: the in-memory restore loop
  (:mod:`curvsafe.restoration.api`); ``run_restore``: files in, restored adapter out.
- ``Objective``, ``LossTerm``: the safety and task objectives (:mod:`curvsafe.objectives`).
- ``CurvSafe``, ``CurvSafeSettings``: the optimizer wrapper and its settings (:mod:`curvsafe.optim`);
  ``CurvSafeTrainer``, ``CurvSafeTrainerMixin``: the HF Trainer (or TRL's) with CurvSafe around its optimizer.
- ``KFAC``, ``EKFAC``, ``LowRank``: the curvature engine's Kronecker operators and their memory bound.
- ``pairwise_scores``: influence of training examples on queries (:mod:`curvsafe.influence`).
- ``estimate``, ``PlanSettings``: memory and cost before a run (:mod:`curvsafe.plan`).
- ``FisherType``, ``KFACApprox``, ``Method``: the string options as enums (:mod:`curvsafe.config`).
"""

from ._version import __version__

_LAZY = {"restore": "restoration", "RestoreResult": "restoration", "run_restore": "restoration",
         "Objective": "objectives", "LossTerm": "objectives", "CurvSafe": "optim", "CurvSafeSettings": "optim",
         "CurvSafeTrainer": "optim", "CurvSafeTrainerMixin": "optim",
         "pairwise_scores": "influence", "KFAC": "curvature",
         "EKFAC": "curvature", "LowRank": "curvature.lowrank", "estimate": "plan", "PlanSettings": "plan",
         "FisherType": "config", "KFACApprox": "config", "Method": "config"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'curvsafe' has no attribute {name!r}")
