"""Memory-bounded factors (curvsafe.curvature.lowrank) against the dense factors and operators, in float64."""

import io

import pytest
import torch
from conftest import make_batch, rel_err, tiny_llama, with_lora

from curvsafe.curvature import EKFAC, KFAC
from curvsafe.curvature.lowrank import LowRank, SketchedFactor, sketch_matrix
from curvsafe.optim import CurvSafe

TARGETS = ("q_proj", "v_proj", "down_proj")  # factor dims 16 (hidden), 24 (intermediate), 8 (kv), 2 (rank)


def model():
    return with_lora(tiny_llama(), targets=TARGETS)


def vector(op, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in op.param_shapes.items()}


def sketched_sides(op):
    return {(n, side) for n, f in op.factors.items() for side in ("A", "G")
            if isinstance(getattr(f, side), SketchedFactor)}


def approx_dense(lam, Q, rest):
    d = Q.shape[0]
    P = Q.double() @ Q.double().T
    return Q.double() @ torch.diag(lam.double()) @ Q.double().T + float(rest) * (torch.eye(d, dtype=torch.float64) - P)


def test_low_rank_settings_are_validated():
    with pytest.raises(ValueError, match="rank"):
        LowRank(rank=0)
    with pytest.raises(ValueError, match="probes"):
        LowRank(probes=-1)
    assert LowRank(max_dense_dim=4, rank=2, oversample=1, probes=4).sketched(16)
    assert not LowRank(max_dense_dim=4, rank=2, oversample=1, probes=13).sketched(16)  # nor with the probe
    assert not LowRank(max_dense_dim=4, rank=12, oversample=8).sketched(16)  # the sketch would not be narrower


def test_sketch_is_exact_when_the_data_has_fewer_tokens_than_the_rank():
    """One sequence of 6 tokens: every factor has rank <= 6 <= k, so the truncated operator is the dense one."""
    m = model()
    data = [make_batch(batch=1, seq=6, pad=False, prompt=1)]
    dense = KFAC(m, low_rank=None).fit(data)
    low = KFAC(m, low_rank=LowRank(max_dense_dim=4, rank=8, oversample=4, probes=2)).fit(data)
    sides = sketched_sides(low)
    assert {"A", "G"} <= {side for _, side in sides}, "both kinds of factor must be sketched"
    v = vector(dense)
    for damping in (1e-3, 0.5):
        a, b = dense.inverse_mv(v, damping), low.inverse_mv(v, damping)
        assert max(rel_err(b[n], a[n]) for n in v) < 1e-5
    a, b = dense.mv(v), low.mv(v)
    assert max(rel_err(b[n], a[n]) for n in v) < 1e-5
    for name, side in sides:
        assert float(getattr(low.eigen(name), f"rest_{side}")) < 1e-6 * float(getattr(low.factors[name], side).trace())
    assert low.curvature_bytes() < dense.curvature_bytes()


@pytest.mark.parametrize("passes", [1, 2])
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_truncated_operator_is_its_stated_approximation(cls, passes):
    """With more tokens than the rank the factors are truncated; the operator must be exactly
    ``G_hat ⊗ A_hat`` (K-FAC; EK-FAC: corrected eigenvalues on the kept x kept part) and its inverse the inverse."""
    m = model()
    data = [make_batch(batch=3, seq=7, seed=s) for s in range(3)]
    op = cls(m, low_rank=LowRank(max_dense_dim=4, rank=3, oversample=2, probes=2, passes=passes)).fit(data)
    assert sketched_sides(op)
    v = vector(op, seed=1)
    out, inv = op.mv(v), op.inverse_mv(v, 0.3)
    for b in op.blocks:
        e = op.eigen(b.name)
        A_hat = approx_dense(e.lam_A, e.QA, e.rest_A) if e.rest_A is not None else op.factors[b.name].A.double()
        G_hat = approx_dense(e.lam_G, e.QG, e.rest_G) if e.rest_G is not None else op.factors[b.name].G.double()
        V = b.as_matrix(v[b.weight_name])
        if cls is KFAC:
            expected = G_hat @ V @ A_hat
            assert rel_err(b.as_matrix(out[b.weight_name]), expected) < 1e-5, b.name
        back = op.mv(inv)
        assert rel_err(back[b.weight_name] + 0.3 * inv[b.weight_name], v[b.weight_name]) < 1e-5, b.name


def test_nystrom_eigen_bounds_against_the_dense_factor():
    """``F_nys ⪯ F``: kept eigenvalues below the true ones, their sum below the true top-k sum, the rest at least
    the true tail mean, the trace kept exactly, ``Q`` orthonormal; a decaying spectrum is recovered closely."""
    g = torch.Generator().manual_seed(0)
    d, n, k = 64, 200, 8
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, -3, d, dtype=torch.float64)
    F = X.T @ X
    sketch = SketchedFactor.zeros(d, k + 16, torch.device("cpu")).add_rows(X)
    lam, Q, rest = sketch.eigen(k)
    true = torch.linalg.eigvalsh(F).flip(0)
    assert (lam.double() <= true[:k] * (1 + 1e-4)).all()
    assert float(lam.sum()) <= float(true[:k].sum()) * (1 + 1e-5)
    assert float(rest) >= float(true[k:].mean()) * (1 - 1e-4)
    assert abs(float(lam.sum()) + float(rest) * (d - k) - float(F.trace())) < 1e-4 * float(F.trace())
    assert rel_err(Q.T.double() @ Q.double(), torch.eye(k, dtype=torch.float64)) < 1e-5
    assert rel_err(lam.double(), true[:k]) < 2e-2  # measured 0.8% (3 decades over 64 dims, s = 3k)


def test_rest_is_the_mean_of_the_left_out_nonzero_eigenvalues_when_rows_are_fewer_than_the_dimension():
    """Fewer rows than dimensions: the factor has rank <= rows, and the rest is the mean over the left-out part of
    that rank, not over the null space (the trace is kept over ``rows`` directions); the row count adds under sums
    and survives means and EMAs."""
    g = torch.Generator().manual_seed(1)
    d, n, k = 64, 40, 8
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    sketch = SketchedFactor.zeros(d, k + 16, torch.device("cpu")).add_rows(X[:25]).add_rows(X[25:])
    assert sketch.rank_bound == n
    lam, Q, rest = sketch.eigen(k)
    true = torch.linalg.eigvalsh(X.T @ X).flip(0)
    assert abs(float(lam.sum()) + float(rest) * (n - k) - float(true.sum())) < 1e-4 * float(true.sum())
    assert float(rest) >= float(true[k:n].mean()) * (1 - 1e-4)
    assert (0.5 * sketch + 0.5 * sketch).rank_bound == d  # two sums of 40 rows: rank <= 80, capped at d
    assert (sketch / 3.0).rank_bound == n


def test_rest_is_the_energy_weighted_mean_of_the_left_out_part_and_preconditions_gradients_better():
    """With a probe, ``rest`` estimates ``tr(F_rest^2) / tr(F_rest)`` for ``F_rest = P F P`` (``P`` the complement
    of the kept basis). On a factor whose rank (120) is below its row count (200), as the gradient factors of the 1B
    shape are, the plain mean spreads the left-out mass over directions that hold none; on vectors in the rows' span
    (as gradients are) the damped inverse with the weighted rest is much closer to the dense one."""
    g = torch.Generator().manual_seed(0)
    d, n, m, k = 256, 200, 120, 32
    mix = torch.randn(m, d, generator=g, dtype=torch.float64) * torch.logspace(0, -0.5, d, dtype=torch.float64)
    X = torch.randn(n, m, generator=g, dtype=torch.float64) @ mix
    F = X.T @ X
    sketch = SketchedFactor.zeros(d, 2 * k, torch.device("cpu"), probes=64).add_rows(X)
    lam, Q, rest = sketch.eigen(k)
    Qd = Q.double()
    P = torch.eye(d, dtype=torch.float64) - Qd @ Qd.T
    F_rest = P @ F @ P
    weighted = float(F_rest.square().sum()) / float(F_rest.trace())
    assert abs(float(rest) - weighted) < 0.1 * weighted  # measured 1.3% (Hutchinson, 64 probes)
    plain = SketchedFactor(sketch.Y, sketch._trace, sketch._rows).eigen(k)[2]  # the same sketch without its probe
    V = X.T @ torch.randn(n, 32, generator=g, dtype=torch.float64)  # 32 vectors in the rows' span
    for relative in (0.1, 1.0):
        damping = relative * float((V * (F @ V)).sum() / V.square().sum())  # restore's convention
        exact = torch.linalg.solve(F + damping * torch.eye(d, dtype=torch.float64), V)

        def error(r):
            approx = approx_dense(lam, Q, r) + damping * torch.eye(d, dtype=torch.float64)
            return rel_err(torch.linalg.solve(approx, V), exact)

        assert error(rest) < 0.8 * error(plain)  # measured 0.50 against 0.74, 0.14 against 0.21


def test_mean_rest_is_the_plain_mean_over_every_left_out_direction():
    """``mean_rest`` (CurvSafe's projection): ``(tr(F) - sum(lam)) / (d - k)``, the probe unused; the kept pairs are
    those of the default."""
    g = torch.Generator().manual_seed(1)
    d, k = 64, 8
    X = torch.randn(40, d, generator=g, dtype=torch.float64)
    sketch = SketchedFactor.zeros(d, 2 * k, torch.device("cpu"), probes=4).add_rows(X)
    lam, Q, weighted = sketch.eigen(k)
    lam_m, Q_m, rest = sketch.eigen(k, mean_rest=True)
    assert torch.equal(lam, lam_m) and torch.equal(Q, Q_m)
    assert float(rest) == pytest.approx((float(X.square().sum()) - float(lam.double().sum())) / (d - k), rel=1e-5)
    assert float(rest) < float(weighted)  # 40 rows: the weighted mean leaves out the 24 empty directions


@pytest.mark.parametrize("mean_rest", [None, False])
def test_curvsafe_projects_sketched_factors_with_the_mean_rest_unless_told_otherwise(mean_rest):
    """CurvSafe's projector gives its sketched factors the plain mean rest by default (``mean_rest=None``); K-FAC's
    own eigen (restore) keeps the energy-weighted one; ``mean_rest=False`` gives the projector that one too."""
    low = LowRank(max_dense_dim=4, rank=3, oversample=2, probes=4, mean_rest=mean_rest)
    m = model()
    safety = [make_batch(batch=3, seq=8, prompt=4, seed=100)]
    opt = CurvSafe(torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2), m, safety,
                   low_rank=low)
    m.train()
    opt.zero_grad()
    m(**make_batch(batch=3, seq=8, seed=1)).loss.backward()
    opt.step()
    proj = opt.constraint.projector
    name, (lam_A, rest_A, _, _) = next((n, r) for n, r in proj.rests.items() if r[1] is not None)
    A = proj.kfac.factors[name].A
    mean = (float(A.trace()) - float(lam_A.sum())) / (A.shape[0] - lam_A.numel())
    weighted = float(A.eigen(3, name)[2])
    assert abs(mean - weighted) > 1e-3 * weighted  # the two conventions differ on this factor
    assert float(rest_A) == pytest.approx(mean if mean_rest is None else weighted, rel=1e-5)
    assert float(proj.kfac.eigen(name).rest_A) == pytest.approx(weighted, rel=1e-5)  # restore's convention


def test_sketch_without_a_probe_loads_and_combines_with_the_plain_mean():
    """A sketch saved before probes existed (no ``probe`` in its state) loads, gives the plain mean, and a sum with
    a probed sketch keeps no probe (so a resumed EMA does not fail)."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(50, 32, generator=g, dtype=torch.float64)
    probed = SketchedFactor.zeros(32, 8, torch.device("cpu"), probes=4).add_rows(X)
    old = SketchedFactor.from_state({k: v for k, v in probed.state().items() if k != "probe"})
    assert old.Z is None and "probe" not in old.state() and "probe" in probed.state()
    lam, _, rest = old.eigen(4)
    assert abs(float(lam.sum()) + float(rest) * (32 - 4) - float(X.square().sum())) < 1e-4 * float(X.square().sum())
    assert (old + probed).Z is None and (0.5 * probed + 0.5 * probed).Z is not None
    running = probed.clone().add_(old)
    assert running.Z is None and rel_err(running.Y, 2 * probed.Y) < 1e-6
    with pytest.raises(TypeError, match="same shape"):
        probed + SketchedFactor.zeros(32, 8, torch.device("cpu"), probes=3)


def test_sketches_add_average_and_ema_like_dense_factors_and_save_as_plain_tensors():
    m = model()
    b1, b2 = make_batch(seed=1), make_batch(seed=2)
    low = LowRank(max_dense_dim=4, rank=3, oversample=2, probes=2)
    both = KFAC(m, low_rank=low).fit([b1, b2])
    split = KFAC(m, low_rank=low).fit([b1]).fit([b2])
    dense = KFAC(m, low_rank=None).fit([b1, b2])
    for name, side in sketched_sides(both):
        s, t = getattr(both.factors[name], side), getattr(split.factors[name], side)
        assert rel_err(t.Y, s.Y) < 1e-6
        full = getattr(dense.factors[name], side).double()  # the sketch is the dense factor times Omega
        assert rel_err(s.Y.double(), full @ s.omega.double()) < 1e-5
        assert abs(float(s.trace()) - float(full.trace())) < 1e-5 * float(full.trace())
    ema = KFAC(m, low_rank=low, ema_decay=0.5).fit([b1, b2])
    assert sketched_sides(ema)
    buffer = io.BytesIO()
    torch.save(both.state_dict(), buffer)
    buffer.seek(0)
    again = KFAC(m, low_rank=low)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    v = vector(both)
    a, b = both.inverse_mv(v, 0.1), again.inverse_mv(v, 0.1)
    assert max(rel_err(b[n], a[n]) for n in v) == 0.0


def test_sketch_refuses_non_finite_data_and_shares_its_test_matrix():
    s = SketchedFactor.zeros(6, 3, torch.device("cpu")).add_rows(torch.full((2, 6), float("nan")))
    with pytest.raises(FloatingPointError, match="layer.A"):
        s.eigen(2, "layer.A")
    assert sketch_matrix(6, 3, torch.device("cpu")) is sketch_matrix(6, 3, torch.device("cpu"))
    with pytest.raises(TypeError, match="same shape"):
        SketchedFactor.zeros(6, 3, torch.device("cpu")) + SketchedFactor.zeros(6, 4, torch.device("cpu"))


def test_curvsafe_with_sketched_factors_steps_like_the_dense_one_when_exact():
    """One short safety prompt (fewer tokens than the rank): the truncated projection is the dense one; the
    truncated path is taken (``_rests``) and survives a state_dict round trip."""
    safety = [make_batch(batch=1, seq=5, pad=False, prompt=4, seed=100)]
    train = [make_batch(batch=3, seq=8, seed=s) for s in range(3)]
    runs = {}
    for key, low in (("dense", None), ("low", LowRank(max_dense_dim=4, rank=12, oversample=2, probes=1))):
        m = model()
        opt = CurvSafe(torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2), m, safety,
                       low_rank=low, refresh_every=1)
        m.train()
        for b in train:
            opt.zero_grad()
            m(**b).loss.backward()
            opt.step()
        runs[key] = (m, opt)
    assert runs["low"][1].constraint.projector.rests and not runs["dense"][1].constraint.projector.rests
    for (n, p), q in zip(runs["dense"][0].named_parameters(), runs["low"][0].parameters()):
        if p.requires_grad:
            assert rel_err(q.detach(), p.detach()) < 1e-5, n
    buffer = io.BytesIO()
    torch.save(runs["low"][1].state_dict(), buffer)
    buffer.seek(0)
    m, opt = runs["low"]
    opt.load_state_dict(torch.load(buffer, weights_only=True))
    assert set(opt.constraint.projector.rests) and opt.constraint.projector.damp > 0


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_second_pass_sketches_each_factor_with_its_own_test_matrix(fisher_type):
    """``LowRank(passes=2)``: the kept sketch is ``F Omega_2`` with ``F`` the dense factor of the same labels (MC:
    the generator rewound) and ``Omega_2 = orth(F Omega)`` from the first pass."""
    m = model()
    data = [make_batch(batch=3, seq=7, seed=s) for s in range(3)]
    settings = dict(max_dense_dim=4, rank=3, oversample=2, probes=2)
    dense = KFAC(m, low_rank=None, fisher_type=fisher_type).fit(data)
    one = KFAC(m, low_rank=LowRank(**settings), fisher_type=fisher_type).fit(data)
    two = KFAC(m, low_rank=LowRank(**settings, passes=2), fisher_type=fisher_type).fit(data)
    sides = sketched_sides(two)
    assert {"A", "G"} <= {side for _, side in sides}
    for name, side in sides:
        F = getattr(dense.factors[name], side).double()
        first, refined = getattr(one.factors[name], side), getattr(two.factors[name], side)
        omega = torch.linalg.qr(first.Y.double()).Q
        assert torch.allclose(refined.omega.double(), omega, atol=1e-5)
        assert rel_err(refined.Y.double(), F @ refined.omega.double()) < 1e-5
        assert refined.refined and not first.refined
        assert torch.equal(refined.Z, first.Z) and float(refined.trace()) == float(first.trace())
    # the next batches' labels are those a one-pass fit would draw next
    assert torch.equal(one._make_generator().get_state(), two._make_generator().get_state())


def test_second_pass_captures_more_of_a_slowly_decaying_factor():
    """One step of subspace iteration: on rows with a slowly decaying spectrum the refined basis keeps more of the
    factor's energy and the truncated factor is closer to the dense one."""
    g = torch.Generator().manual_seed(0)
    d, n, rank = 48, 200, 6
    rows = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.arange(1, d + 1, dtype=torch.float64) ** -0.3
    F = rows.T @ rows
    one = SketchedFactor.zeros(d, rank + 2, torch.device("cpu"), probes=4).add_rows(rows)
    omega = torch.linalg.qr(one.Y.double()).Q.float()
    two = one.with_sketch((F @ omega.double()).float(), omega)
    kept, error = [], []
    for f in (one, two):
        lam, Q, rest = f.eigen(rank)
        kept.append(float(torch.trace(Q.double().T @ F @ Q.double())))
        error.append(rel_err(approx_dense(lam, Q, rest), F))
    top = float(torch.linalg.eigvalsh(F)[-rank:].sum())
    assert kept[1] > kept[0] + 0.05 * top, kept  # measured: 0.76 -> 0.89 of the top-6 eigenvalues' sum
    assert error[1] < 0.8 * error[0], error  # measured: 0.73 -> 0.47 relative Frobenius error


def test_second_pass_state_and_refusals():
    m = model()
    data = [make_batch(batch=3, seq=7, seed=s) for s in range(2)]
    low = LowRank(max_dense_dim=4, rank=3, oversample=2, probes=2, passes=2)
    op = EKFAC(m, low_rank=low).fit(data)
    v = vector(op)
    saved = io.BytesIO()
    torch.save(op.state_dict(), saved)
    saved.seek(0)
    back = KFAC(m, low_rank=low)
    back.load_state_dict(torch.load(saved))
    ref = KFAC(m, low_rank=low).fit(data)
    a, b = ref.inverse_mv(v, 0.2), back.inverse_mv(v, 0.2)
    assert max(rel_err(b[n], a[n]) for n in v) < 1e-6
    name, side = sorted(sketched_sides(op))[0]
    refined = getattr(ref.factors[name], side)
    with pytest.raises(TypeError, match="test matrix"):
        refined + getattr(KFAC(m, low_rank=LowRank(max_dense_dim=4, rank=3, oversample=2, probes=2))
                          .fit(data).factors[name], side)
    with pytest.raises(ValueError, match="cannot add"):
        ref.fit(data)
    with pytest.raises(ValueError, match="passes=1"):
        KFAC(m, low_rank=low, ema_decay=0.5)
    with pytest.raises(ValueError, match="passes=1"):  # CurvSafe refits into an EMA
        CurvSafe(torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]), m, data, low_rank=low)
    with pytest.raises(ValueError, match="passes"):
        LowRank(passes=3)
