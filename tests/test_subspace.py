"""Warm-started truncated eigenbases (curvsafe.curvature.subspace) against float64 decompositions of the dense
factor, and CurvSafe's projection with them."""

import pytest
import torch
from conftest import rel_err

from curvsafe.curvature.subspace import SubspaceEigen, subspace_eigen, subspace_eigens


def factor(d=40, rank=None, decay=0.85, seed=0):
    """A PSD factor with eigenvalues ``decay**i`` (the first ``rank`` of them when given, the rest 0), float32."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    lam = decay ** torch.arange(d, dtype=torch.float64)
    if rank is not None:
        lam[rank:] = 0
    return (Q * lam) @ Q.T


def mean_rest(lam_left):
    return float(lam_left.mean())


def random_basis(d, k, seed=1):
    return torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed))).Q


def test_settings_are_validated():
    with pytest.raises(ValueError, match="rank"):
        SubspaceEigen(rank=0)
    with pytest.raises(ValueError, match="iterations"):
        SubspaceEigen(iterations=0)
    s = SubspaceEigen(min_dim=32, rank=8)
    assert s.applies(32) and not s.applies(31) and not SubspaceEigen(min_dim=4, rank=40).applies(40)


@pytest.mark.parametrize("warm", [False, True])
def test_exact_top_pairs_and_rest_from_an_invariant_start_or_without_one(warm):
    """From the exact top-k eigenvectors (an invariant subspace) or with no previous basis (a full eigh): the top-k
    eigenpairs and the mean of the left-out eigenvalues, exactly."""
    F64 = factor()
    vals, vecs = torch.linalg.eigh(F64)
    k = 10
    previous = vecs[:, -k:].float() if warm else None
    lam, Q, rest = subspace_eigen(F64.float(), previous, rank=k)
    assert lam.shape == (k,) and Q.shape == (40, k)
    assert rel_err(lam.double(), vals[-k:]) < 1e-5
    assert rel_err(Q.double() @ torch.diag(lam.double()) @ Q.double().T,
                   vecs[:, -k:] @ torch.diag(vals[-k:]) @ vecs[:, -k:].T) < 1e-5
    assert float(rest) == pytest.approx(mean_rest(vals[:-k]), rel=1e-4)
    assert rel_err((Q.double().T @ Q.double()), torch.eye(k, dtype=torch.float64)) < 1e-5


def test_a_factor_of_rank_at_most_k_is_reproduced_exactly_from_any_start():
    F64 = factor(rank=6)
    lam, Q, rest = subspace_eigen(F64.float(), random_basis(40, 8), rank=8)
    assert abs(float(rest)) < 1e-6 * float(F64.trace())
    assert rel_err(Q.double() @ torch.diag(lam.double()) @ Q.double().T, F64) < 1e-5


def test_repeated_decompositions_converge_to_the_top_pairs():
    """Each decomposition warm-started at the last one's basis (as CurvSafe's refreshes do): the error in the kept
    eigenvalues shrinks to rounding, and it shrinks faster with more iterations per decomposition."""
    F64 = factor(decay=0.8)
    vals = torch.linalg.eigh(F64).eigenvalues
    k = 8
    errors = {}
    for iterations in (1, 2):
        Q, history = random_basis(40, k), []
        for _ in range(20):
            lam, Q, _ = subspace_eigen(F64.float(), Q, rank=k, iterations=iterations)
            history.append(rel_err(lam.double(), vals[-k:]))
        errors[iterations] = history
        assert history[-1] < 1e-5 and history[0] > 1e-3  # a random start is far off; the iteration gets there
        assert all(b <= a * 1.01 + 1e-6 for a, b in zip(history, history[1:]))
    assert errors[2][2] < errors[1][2]


def test_rayleigh_ritz_values_never_exceed_the_true_ones_and_rest_is_the_left_out_mean():
    F64 = factor(decay=0.95)
    vals = torch.linalg.eigh(F64).eigenvalues
    lam, _, rest = subspace_eigen(F64.float(), random_basis(40, 6), rank=6)
    assert torch.all(lam.double() <= vals[-6:] * (1 + 1e-5))
    assert float(rest) == pytest.approx((float(F64.trace()) - float(lam.double().sum())) / 34, rel=1e-4)


def test_non_finite_factors_are_refused_by_name():
    F = factor().float()
    F[3, 4] = float("nan")
    with pytest.raises(FloatingPointError, match="layer.A"):
        subspace_eigen(F, None, rank=4, name="layer.A")


def test_equal_factors_are_decomposed_once_and_each_starts_from_its_own_previous_basis():
    F = factor().float()
    other = factor(seed=3).float()
    settings = SubspaceEigen(min_dim=8, rank=5)
    first = subspace_eigens({"q.A": F, "k.A": F.clone(), "o.A": other}, {}, settings)
    assert first["q.A"] is first["k.A"] and first["o.A"] is not first["q.A"]
    again = subspace_eigens({"q.A": F, "o.A": other}, {"q.A": first["q.A"][1], "o.A": first["o.A"][1]}, settings)
    for key in again:  # warm at the invariant subspace of an unchanged factor: the same pairs
        assert rel_err(again[key][0], first[key][0]) < 1e-5
