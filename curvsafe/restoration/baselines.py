"""Baselines, run on the same data and under the same task budget as the curvature methods.

- ``revert``: scale the adapter toward 0 (``lora_B ← α lora_B``), the smallest α whose task loss meets the budget.
- ``safelora`` (Hsu et al., 2024): per LoRA layer, the alignment matrix ``C = V V^T / ||V||_F`` with
  ``V = W_aligned - W_unaligned``; layers whose update ``ΔW`` is least similar to its projection ``C ΔW`` are
  projected (``lora_B ← C lora_B``) one by one, least similar first, while the budget holds.
- ``resta`` (Bhardwaj et al., 2024): add the safety vector ``β (W_aligned - W_unaligned)`` to the base weights,
  the largest β in [0, 1] that meets the budget. Not expressible as a LoRA adapter: the result is a full model.

All three need only forward passes; ``safelora`` and ``resta`` need the unaligned (pre-alignment) weights.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping

import torch
from torch import Tensor

from ..config import BASELINE_METHODS
from ..objectives import Objective
from .api import RestoreResult, StopReason, budget_of

BASELINES = BASELINE_METHODS


def _lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and m.active_adapters]
    if not layers:
        raise ValueError("the model has no active LoRA adapter")
    return layers


def _bisect(evaluate: Callable[[float], float], budget: float, lo: float, hi: float, *, want_large: bool,
            steps: int = 10) -> float:
    """The extreme value in [lo, hi] whose loss is within budget; ``evaluate(lo)`` must be within it when
    ``want_large`` (``hi`` otherwise)."""
    good = lo if want_large else hi
    bad = hi if want_large else lo
    if evaluate(bad) <= budget:
        return bad
    for _ in range(steps):
        mid = 0.5 * (good + bad)
        if evaluate(mid) <= budget:
            good = mid
        else:
            bad = mid
    return good


def _begin(model, safety: Objective, task: Objective, task_budget: float, task_budget_abs: float):
    """Start time, task and safety losses of the fine-tuned model, and the task-loss budget."""
    start = time.perf_counter()
    l0, s0 = task.evaluate(model), safety.evaluate(model)
    return start, l0, s0, budget_of(l0, task_budget, task_budget_abs)


def _result(name, model, safety, s0, l0, l_after, budget, start, stopped: StopReason, detail: str,
            **details) -> RestoreResult:
    s_after = safety.evaluate(model)
    if not s_after < s0:
        stopped = StopReason.NO_DESCENT
        detail = f"the safety objective did not go down ({s0:.4f} -> {s_after:.4f}); {detail}"
    return RestoreResult(method=name, safety_objective={"before": s0, "after": s_after, "target": None},
                         task_nll={"before": l0, "after": l_after, "budget": budget}, stopped=stopped,
                         stop_detail=detail, details=details, seconds=time.perf_counter() - start)


def revert(model, safety: Objective, task: Objective, *, task_budget=0.02, task_budget_abs=0.01) -> RestoreResult:
    """Scale the adapter toward 0 within the task budget (module docstring)."""
    start, l0, s0, budget = _begin(model, safety, task, task_budget, task_budget_abs)
    originals = {n: {a: m.lora_B[a].weight.detach().clone() for a in m.active_adapters} for n, m in _lora_layers(model)}

    def set_alpha(alpha: float) -> float:
        with torch.no_grad():
            for n, m in _lora_layers(model):
                for a in m.active_adapters:
                    m.lora_B[a].weight.copy_(alpha * originals[n][a])
        return task.evaluate(model)

    alpha = _bisect(set_alpha, budget, 0.0, 1.0, want_large=False)  # alpha 1 (the fine-tune) is inside
    l_after = set_alpha(alpha)
    if alpha == 0.0:
        stopped, detail = StopReason.COMPLETE, "the adapter is fully reverted (alpha 0) inside the task budget"
    else:
        stopped, detail = StopReason.BUDGET, f"the smallest adapter scale inside the task budget is alpha {alpha:.4f}"
    return _result("revert", model, safety, s0, l0, l_after, budget, start, stopped, detail, alpha=alpha)


def _base_weight_name(peft_name: str) -> str:
    """``base_model.model.X.base_layer.weight`` -> ``X.weight`` (the name in a plain model's state dict)."""
    name = peft_name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def safelora(model, safety: Objective, task: Objective, unaligned: Mapping[str, Tensor], *, task_budget=0.02,
             task_budget_abs=0.01) -> RestoreResult:
    """Safe LoRA: project the least aligned LoRA layers onto the alignment subspace (module docstring)."""
    start, l0, s0, budget = _begin(model, safety, task, task_budget, task_budget_abs)
    candidates = []
    for name, layer in _lora_layers(model):
        key = _base_weight_name(f"{name}.base_layer.weight")
        if key not in unaligned:
            continue
        W = layer.base_layer.weight.detach().float()
        V = W - unaligned[key].float().to(W.device)
        if float(V.norm()) == 0.0:
            continue
        C = V @ V.T / V.norm()
        for a in layer.active_adapters:
            B, A = layer.lora_B[a].weight.detach().float(), layer.lora_A[a].weight.detach().float()
            dW = B @ A
            proj = C @ dW
            sim = float((dW * proj).sum() / (dW.norm() * proj.norm()).clamp_min(1e-30))
            candidates.append((sim, name, a, C))
    if not candidates:
        raise ValueError("safelora: no LoRA layer has a matching weight in the unaligned model")
    projected = []
    for sim, name, a, C in sorted(candidates, key=lambda c: c[0]):
        layer = model.get_submodule(name)
        old = layer.lora_B[a].weight.detach().clone()
        with torch.no_grad():
            layer.lora_B[a].weight.copy_((C @ old.float()).to(old.dtype))
        if task.evaluate(model) <= budget:
            projected.append({"layer": name, "similarity": sim})
        else:
            with torch.no_grad():
                layer.lora_B[a].weight.copy_(old)
            break
    if len(projected) == len(candidates):
        stopped, detail = StopReason.COMPLETE, f"all {len(candidates)} LoRA layers projected inside the task budget"
    else:
        stopped, detail = StopReason.BUDGET, (f"{len(projected)} of {len(candidates)} LoRA layers projected before "
                                              f"the next one broke the task budget")
    return _result("safelora", model, safety, s0, l0, task.evaluate(model), budget, start, stopped, detail,
                   projected=projected, candidates=len(candidates))


def resta(model, safety: Objective, task: Objective, unaligned: Mapping[str, Tensor], *, task_budget=0.02,
          task_budget_abs=0.01) -> RestoreResult:
    """RESTA: add the safety vector to the base weights within the task budget (module docstring)."""
    start, l0, s0, budget = _begin(model, safety, task, task_budget, task_budget_abs)
    pairs = []
    for name, p in model.named_parameters():
        key = _base_weight_name(name)
        if p.requires_grad or key not in unaligned or unaligned[key].shape != p.shape:
            continue
        pairs.append((p, p.detach().clone(), p.detach() - unaligned[key].to(p)))
    if not pairs:
        raise ValueError("resta: no base weight matches the unaligned model")

    def set_beta(beta: float) -> float:
        with torch.no_grad():
            for p, aligned, delta in pairs:
                p.copy_(aligned + beta * delta)
        return task.evaluate(model)

    beta = _bisect(set_beta, budget, 0.0, 1.0, want_large=True)
    l_after = set_beta(beta)
    if beta == 1.0:
        stopped, detail = StopReason.COMPLETE, "the whole safety vector (beta 1) fits the task budget"
    else:
        stopped = StopReason.BUDGET
        detail = f"the largest safety-vector scale inside the task budget is beta {beta:.4f}"
    return _result("resta", model, safety, s0, l0, l_after, budget, start, stopped, detail, beta=beta)
