"""EK-FAC against curvlinops' EKFACLinearOperator on LoRA modules."""

import numpy as np
import pytest
import torch
from conftest import make_batch, rel_err, tiny_llama, with_lora

from curvsafe.curvature import EKFAC
from curvsafe.curvature.eigen import safe_eigh


def dense(op, dim):
    return np.stack([op.matvec(e) for e in np.eye(dim)], axis=1)


class LastTokenLM(torch.nn.Module):
    """curvlinops' EK-FAC needs one loss term per datum: the logits that predict each sequence's last token."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, input_ids):
        return self.m(input_ids=input_ids, use_cache=False).logits[:, -2]


def test_ekfac_matches_curvlinops_on_lora():
    """Sequences are the examples in both libraries; only the last token is a loss term (curvlinops' EK-FAC takes
    one loss term per datum), the gradient still flows through every token by attention. With a sum-reduced loss
    curvlinops holds (batch * seq) times our factors and eigenvalues (we average over the non-padding tokens), so
    its dense operator divided by (batch * seq) equals ours. Compared as dense operators: eigenvectors of repeated
    eigenvalues are not unique, the operator is."""
    from curvlinops import EKFACLinearOperator

    model = with_lora(tiny_llama())
    batch = make_batch(batch=6, seq=9, pad=False, prompt=0)
    batch["labels"][:, :-1] = -100
    ours = EKFAC(model).fit([batch])
    params = [model.get_submodule(b.name).weight for b in ours.blocks]
    ref = EKFACLinearOperator(LastTokenLM(model).eval(), torch.nn.CrossEntropyLoss(reduction="sum"), params,
                              [(batch["input_ids"], batch["input_ids"][:, -1])], fisher_type="empirical",
                              check_deterministic=False)
    n, t = batch["input_ids"].shape
    ref_dense = dense(ref.to_scipy(), ref.shape[0]) / (n * t)
    ours_dense = dense(ours.to_scipy(), ours.dim)
    assert rel_err(ours_dense, ref_dense) <= 1e-4
    # the corrected eigenvalues differ from K-FAC's (otherwise the correction would be a no-op)
    block = ours.blocks[0]
    e = ours.eigen(block.name)
    assert rel_err(ours.corrected[block.name], torch.outer(e.lam_G, e.lam_A)) > 1e-3


def test_ekfac_inverse_is_exact_inverse_of_its_mv():
    model = with_lora(tiny_llama())
    ekfac = EKFAC(model).fit([make_batch(), make_batch(seed=3)])
    v = {n: torch.randn(s, dtype=torch.float64) for n, s in ekfac.param_shapes.items()}
    x = ekfac.inverse_mv(v, damping=0.3)
    back = ekfac.mv(x)
    for n in v:
        assert rel_err(back[n] + 0.3 * x[n], v[n]) <= 1e-5


def test_ekfac_fit_failure_keeps_previous_state():
    model = with_lora(tiny_llama())
    ekfac = EKFAC(model).fit([make_batch()])
    before = {n: t.clone() for n, t in ekfac.corrected.items()}
    bad = make_batch()
    bad["labels"][:] = -100
    with pytest.raises(ValueError):
        ekfac.fit([bad])
    assert all(torch.equal(before[n], ekfac.corrected[n]) for n in before)


def test_safe_eigh_guards():
    with pytest.raises(FloatingPointError, match="layer.A"):
        safe_eigh(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), "layer.A")
    m = torch.randn(5, 3)
    vals, vecs = safe_eigh(m @ m.T, "x")
    assert vals.min() >= 0 and vals.dtype == torch.float32
    assert rel_err(vecs @ torch.diag(vals) @ vecs.T, m @ m.T) <= 1e-5


@pytest.mark.parametrize("batch_bytes", [1 << 28, 8 * 25 * 2])  # one call per size; at most 2 of 5x5 per call
def test_safe_eigh_many_matches_safe_eigh_and_shares_equal_matrices(monkeypatch, batch_bytes):
    from curvsafe.curvature import eigen
    from curvsafe.curvature.eigen import safe_eigh_many

    monkeypatch.setattr(eigen, "_BATCH_BYTES", batch_bytes)
    g = torch.Generator().manual_seed(0)
    mats = {}
    for name, n in (("a", 5), ("b", 7), ("c", 5), ("d", 1), ("e", 5), ("f", 5)):
        m = torch.randn(n, n + 2, generator=g)
        mats[name] = m @ m.T
    mats["a_twin"] = mats["a"].clone()
    batches = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: batches.append(m.shape[0]) or eigh(m))
    many = safe_eigh_many(mats)
    assert sorted(batches) == ([1, 1, 4] if batch_bytes > 1000 else [1, 1, 2, 2])  # the twin is not decomposed
    monkeypatch.undo()
    assert list(many) == list(mats)
    for name, m in mats.items():
        vals, vecs = many[name]
        ref_vals, _ = safe_eigh(m, name)
        assert torch.allclose(vals, ref_vals, atol=1e-5, rtol=1e-5)
        assert torch.allclose(vecs @ torch.diag(vals) @ vecs.T, m, atol=1e-4)
        assert torch.allclose(vecs.T @ vecs, torch.eye(m.shape[0]), atol=1e-5)
    assert many["a_twin"][1] is many["a"][1]
    assert many["c"][1] is not many["a"][1]
    for name, (vals, vecs) in safe_eigh_many(mats, dtype=torch.float32).items():  # the faster, coarser path
        assert torch.allclose(vals, many[name][0], atol=1e-4, rtol=1e-4)
        assert torch.allclose(vecs @ torch.diag(vals) @ vecs.T, mats[name], atol=1e-4)
    with pytest.raises(FloatingPointError, match="factor b"):
        safe_eigh_many({"a": mats["a"], "b": torch.full((7, 7), float("nan"))})


def test_ekfac_matches_kronfluence_on_lora(tmp_path):
    """kronfluence's EK-FAC with the empirical Fisher on every token (its sequences are the examples, as ours):
    its covariances and eigenvalue corrections are sums over the tokens where ours are means, so they are
    ``tokens`` times ours; its eigenbases come from the same factors, so the corrected eigenvalues agree entry by
    entry (up to the float64 eigensolver's sign choices, which the squares remove)."""
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task

    model = with_lora(tiny_llama(dtype=torch.float32))
    batches = [make_batch(batch=4, seq=6, seed=s, pad=False, prompt=0) for s in (1, 2)]
    ours = EKFAC(model, low_rank=None).fit(batches)
    names = [b.name for b in ours.blocks]

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                     reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return names

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(4)]
    task = LMTask()
    analyzer = Analyzer("oracle", prepare_model(with_lora(tiny_llama(dtype=torch.float32)), task), task, cpu=True,
                        disable_tqdm=True, output_dir=str(tmp_path), log_level=logging.WARNING)
    analyzer.fit_all_factors("f", rows, per_device_batch_size=4, overwrite_output_dir=True,
                             factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True))
    cov, lam = analyzer.load_covariance_matrices("f"), analyzer.load_lambda_matrices("f")
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    for n in names:
        assert rel_err(ours.factors[n].A * tokens, cov["activation_covariance"][n]) < 1e-5, n
        assert rel_err(ours.factors[n].G * tokens, cov["gradient_covariance"][n]) < 1e-5, n
        assert rel_err(ours.corrected[n] * tokens, lam["lambda_matrix"][n]) < 1e-4, n


def test_eigen_dtype_defaults_and_override(monkeypatch):
    """K-FAC decomposes in float64 (its eigenvalues are the curvature), EK-FAC in float32 (it re-fits them);
    either takes ``eigen_dtype``; the float64 basis's EK-FAC operator is within float32 resolution of the
    default's on this well-conditioned tiny model."""
    from curvsafe.curvature import KFAC
    from curvsafe.curvature import kfac as kfac_module

    seen = []
    real = kfac_module.safe_eigh_many
    monkeypatch.setattr(kfac_module, "safe_eigh_many",
                        lambda m, dtype, **kw: seen.append(dtype) or real(m, dtype=dtype, **kw))
    batches = [make_batch(seed=s) for s in range(2)]
    model = with_lora(tiny_llama())
    for cls, dtype, expected in ((KFAC, None, torch.float64), (EKFAC, None, torch.float32),
                                 (EKFAC, torch.float64, torch.float64), (KFAC, torch.float32, torch.float32)):
        op = cls(model, eigen_dtype=dtype).fit(batches)
        op.eigen(op.blocks[0].name)
        assert seen.pop() == expected
    v = {n: torch.randn(s, dtype=torch.float64) for n, s in op.param_shapes.items()}
    f32, f64 = EKFAC(model).fit(batches), EKFAC(model, eigen_dtype=torch.float64).fit(batches)
    x32, x64 = f32.inverse_mv(v, damping=0.1), f64.inverse_mv(v, damping=0.1)
    assert max(rel_err(x32[n], x64[n]) for n in v) <= 1e-4
    with pytest.raises(ValueError, match="eigen_dtype"):
        KFAC(model, eigen_dtype=torch.float16)
