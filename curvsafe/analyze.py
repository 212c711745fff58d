"""``curvsafe analyze``: does the fine-tuned model keep the aligned model's loss geometry on harmful content?

On the weights of the layers the adapter touches (the base linear weights; the fine-tuned model is the aligned
one with the adapter merged):

1. per-example loss correlation (Pearson, Spearman) between the aligned and the fine-tuned model, on harmful
   and on benign data (mean response NLL per example);
2. the top-k Hessian eigenpairs of the harmful loss at both models (Lanczos with full reorthogonalisation over
   exact Hessian-vector products) and the overlap of the two eigenspaces (principal angles; overlap =
   mean cos^2, 1 for the same subspace, about k/dim for unrelated ones);
3. loss-landscape slices of the harmful and benign losses: 1-D along the fine-tuning direction
   (aligned -> fine-tuned at alpha 0 -> 1) and 2-D over that direction and a filter-normalised random direction
   (Li et al., 2018: each row of the random matrix rescaled to the norm of the weight's row).

Writes ``analysis.json`` and ``correlation.png``, ``landscape_1d.png``, ``landscape_2d.png`` into the output
folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .curvature import hvp
from .curvature.vectors import dot, flatten, unflatten
from .data import load_pairs, make_batches
from .nll import example_mean_nll, example_nlls


def correlations(a: Sequence[float], b: Sequence[float]) -> dict:
    """Pearson and Spearman correlation of two equally long sequences, and their length."""
    from scipy.stats import pearsonr, spearmanr

    return {"pearson": float(pearsonr(a, b)[0]), "spearman": float(spearmanr(a, b)[0]), "n": len(a)}


def lanczos(matvec: Callable[[Tensor], Tensor], dim: int, k: int, *, steps: Optional[int] = None, seed: int = 0,
            dtype=torch.float64) -> tuple[Tensor, Tensor]:
    """Top-``k`` (largest algebraic) eigenpairs of a symmetric operator: ``steps`` Lanczos iterations with full
    reorthogonalisation, then the Ritz pairs. Returns (values (k,), vectors (dim, k))."""
    steps = min(dim, steps or max(2 * k + 10, 20))
    q = torch.randn(dim, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    Q = torch.zeros(dim, steps, dtype=dtype)
    alpha, beta = torch.zeros(steps, dtype=dtype), torch.zeros(steps, dtype=dtype)
    q = q / q.norm()
    m = steps
    for j in range(steps):
        Q[:, j] = q
        w = matvec(q).to(dtype)
        alpha[j] = w @ q
        w = w - Q[:, :j + 1] @ (Q[:, :j + 1].T @ w)
        w = w - Q[:, :j + 1] @ (Q[:, :j + 1].T @ w)  # twice is enough
        if j + 1 < steps:
            beta[j] = w.norm()
            if beta[j] < 1e-12:
                m = j + 1
                break
            q = w / beta[j]
    T = torch.diag(alpha[:m]) + torch.diag(beta[:m - 1], 1) + torch.diag(beta[:m - 1], -1)
    vals, vecs = torch.linalg.eigh(T)
    order = torch.argsort(vals, descending=True)[:k]
    return vals[order], Q[:, :m] @ vecs[:, order]


def subspace_overlap(U: Tensor, V: Tensor) -> dict:
    """Principal angles (degrees) between the column spaces of orthonormal U and V, and mean cos^2."""
    cos = torch.linalg.svdvals(U.T @ V).clamp(0, 1)
    return {"principal_angles_deg": [math.degrees(math.acos(float(c))) for c in cos],
            "overlap": float((cos ** 2).mean())}


def analyze(model_dir: str | Path, adapter_dir: str | Path, harmful_file: str | Path, benign_file: str | Path,
            out_dir: str | Path, *, k: int = 5, grid: int = 9, limit: int = 64, seed: int = 0,
            force: bool = False) -> dict:
    """Run the three analyses (module docstring) and write the JSON and plots into the folder ``out_dir``
    (atomically; an existing one is replaced only with ``force``)."""
    from .io import check_out, staged_dir
    from .models import fit_max_length, load_model

    out = check_out(out_dir, force, inputs=[model_dir, adapter_dir, harmful_file, benign_file])
    aligned, tok = load_model(model_dir)
    tuned, _ = load_model(model_dir, adapter_dir)
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in tuned.named_modules() if n.endswith("lora_A")}
    if not lora_modules:
        raise ValueError(f"{adapter_dir}: the adapter has no LoRA modules")
    tuned = tuned.merge_and_unload()
    max_length = fit_max_length(256, aligned)
    harmful = make_batches(tok, load_pairs(harmful_file)[:limit], batch_size=16, max_length=max_length)
    benign = make_batches(tok, load_pairs(benign_file)[:limit], batch_size=16, max_length=max_length)

    result: dict = {"correlation": {}}
    per = {}
    for name, batches in (("harmful", harmful), ("benign", benign)):
        a, b = example_nlls(aligned, batches), example_nlls(tuned, batches)
        per[name] = (a, b)
        result["correlation"][name] = correlations(a, b)

    names = [f"{m.removeprefix('base_model.model.')}.weight" for m in sorted(lora_modules)]
    p_al = {n: p for n, p in aligned.named_parameters() if n in names}
    p_ft = {n: p for n, p in tuned.named_parameters() if n in names}
    dim = sum(p.numel() for p in p_al.values())

    eig = {}
    for label, model, params in (("aligned", aligned, p_al), ("fine_tuned", tuned, p_ft)):
        def matvec(x, model=model, params=params):
            v = {n: t.to(params[n].dtype) for n, t in unflatten(x, {n: p.shape for n, p in params.items()}).items()}
            return flatten(hvp(model, harmful, v, list(params), method="double_backward"), list(params)).double()

        vals, vecs = lanczos(matvec, dim, k, seed=seed)
        eig[label] = (vals, vecs)
    result["hessian"] = {"params": len(names), "dim": dim, "k": k,
                         "eigenvalues": {lab: v[0].tolist() for lab, v in eig.items()},
                         **subspace_overlap(eig["aligned"][1], eig["fine_tuned"][1]),
                         "random_overlap_expected": k / dim}

    direction = {n: (p_ft[n].detach() - p_al[n].detach()) for n in names}
    g = torch.Generator().manual_seed(seed)
    rand = {}
    for n in names:
        r = torch.randn(p_al[n].shape, generator=g).to(p_al[n])
        rand[n] = r * (p_al[n].detach().norm(dim=1, keepdim=True) / r.norm(dim=1, keepdim=True).clamp_min(1e-12))
    base = {n: p.detach().clone() for n, p in p_al.items()}

    def at(a: float, b: float, batches) -> float:
        with torch.no_grad():
            for n, p in p_al.items():
                p.copy_(base[n] + a * direction[n] + b * rand[n])
        return example_mean_nll(aligned, batches)

    alphas = [round(-0.5 + 0.1 * i, 6) for i in range(21)]  # includes 0 (aligned) and 1 (fine-tuned) exactly
    result["landscape_1d"] = {"alpha": alphas, "harmful": [at(a, 0.0, harmful) for a in alphas],
                              "benign": [at(a, 0.0, benign) for a in alphas]}
    scale = float(dot(direction, direction) ** 0.5 / dot(rand, rand) ** 0.5)
    ax = [round(v, 6) for v in torch.linspace(-0.5, 1.5, grid).tolist()]
    bx = [round(v, 6) for v in torch.linspace(-1.0, 1.0, grid).tolist()]
    result["landscape_2d"] = {"alpha": ax, "beta": bx, "random_scale": scale,
                              "harmful": [[at(a, b * scale, harmful) for a in ax] for b in bx],
                              "benign": [[at(a, b * scale, benign) for a in ax] for b in bx]}
    at(0.0, 0.0, harmful)  # restore the aligned weights
    with staged_dir(out) as tmp:
        (tmp / "analysis.json").write_text(json.dumps(result, indent=2))
        _plots(tmp, result, per)
    return result


def _plots(out: Path, result: dict, per: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, name in zip(axes, ("harmful", "benign")):
        a, b = per[name]
        c = result["correlation"][name]
        ax.scatter(a, b, s=10)
        ax.set_title(f"{name}: Pearson {c['pearson']:.2f}, Spearman {c['spearman']:.2f}")
        ax.set_xlabel("aligned NLL per example")
        ax.set_ylabel("fine-tuned NLL per example")
    fig.tight_layout()
    fig.savefig(out / "correlation.png", dpi=100)
    plt.close(fig)

    l1 = result["landscape_1d"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(l1["alpha"], l1["harmful"], label="harmful")
    ax.plot(l1["alpha"], l1["benign"], label="benign")
    ax.axvline(0, color="k", lw=0.5)
    ax.axvline(1, color="r", lw=0.5)
    ax.set_xlabel("alpha (0 = aligned, 1 = fine-tuned)")
    ax.set_ylabel("mean NLL")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "landscape_1d.png", dpi=100)
    plt.close(fig)

    l2 = result["landscape_2d"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in zip(axes, ("harmful", "benign")):
        cs = ax.contourf(l2["alpha"], l2["beta"], l2[name], levels=20)
        fig.colorbar(cs, ax=ax)
        ax.plot([0, 1], [0, 0], "r.")
        ax.set_title(f"{name} loss")
        ax.set_xlabel("fine-tuning direction")
        ax.set_ylabel("random direction (filter-normalised)")
    fig.tight_layout()
    fig.savefig(out / "landscape_2d.png", dpi=100)
    plt.close(fig)
