"""Kernel-level tests: every op x backend x dtype x odd shape against the PyTorch reference, and the reference
against float64 loops written from the definitions.

Triton runs in the interpreter on CPU (TRITON_INTERPRET=1, set in conftest before import) and natively on a GPU,
where the C++ (CPU-only) backend is not swept; bf16 is checked only where the backend computes it correctly (not
in the interpreter).
"""

import pytest
import torch
from curvsafe.kernels import (covariance_update, kron_eigen_apply, linear_fisher_diag, linear_fisher_vp,
                              mirror_lower_)
from curvsafe.kernels import reference as ref
from curvsafe.kernels._cpp import load_extension
from curvsafe.kernels._triton import HAS_TRITON, INTERPRET

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BACKENDS = ["torch"] + (["cpp"] if not CUDA and load_extension() is not None else []) + (
    ["triton"] if HAS_TRITON and (CUDA or INTERPRET) else [])
SHAPES = [(1, 1, 1), (17, 63, 5), (63, 17, 33), (130, 40, 70)]  # (T, d_in, d_out)


def dtypes_for(backend):
    if backend == "triton" and not CUDA:
        return [torch.float32, torch.float16]  # the interpreter's bf16 arithmetic is wrong
    return [torch.float32, torch.float16, torch.bfloat16]


def tolerance(backend, dtype):
    """Relative (Frobenius) tolerance against the reference run on the same rounded inputs."""
    if backend == "triton" and CUDA:
        # fp32 operands (fp32 inputs, and the fp32 intermediates of kron_eigen_apply's GEMM chain for half inputs)
        # run as TF32 on the tensor cores: measured 2e-3 to 3e-3 on an H200
        return {torch.float32: 5e-3, torch.float16: 5e-3, torch.bfloat16: 1e-2}[dtype]
    return {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def close(a, b, tol):
    return torch.allclose(a, b) if b.abs().max() == 0 else rel(a, b) <= tol


def segments(T, gen):
    """Sorted segment ids with unequal lengths, including length-1 segments."""
    if T == 1:
        return torch.zeros(1, dtype=torch.long)
    cuts = torch.sort(torch.randperm(T - 1, generator=gen)[: max(1, T // 5)] + 1).values
    ids = torch.zeros(T, dtype=torch.long)
    ids[cuts] = 1
    ids = torch.cumsum(ids, 0)
    ids[-1] = ids[-2] + 1  # a final length-1 segment
    return ids


def data(T, d_in, d_out, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g).to(dtype)
    gy = torch.randn(T, d_out, generator=g).to(dtype)
    V = torch.randn(d_out, d_in, generator=g).to(dtype)
    return x.to(DEVICE), gy.to(DEVICE), V.to(DEVICE), segments(T, g).to(DEVICE)


def backend_params():
    return [(b, dt) for b in BACKENDS for dt in dtypes_for(b)]


# ---------------------------------------------------------------- reference vs float64 loops
def test_reference_against_float64_loops():
    g = torch.Generator().manual_seed(1)
    T, d_in, d_out = 9, 4, 3
    x = torch.randn(T, d_in, generator=g, dtype=torch.float64)
    gy = torch.randn(T, d_out, generator=g, dtype=torch.float64)
    V = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    mask = (torch.rand(T, generator=g) > 0.4).double()
    seg = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4])
    cov = torch.zeros(d_in, d_in, dtype=torch.float64)
    for t in range(T):
        cov += mask[t] * torch.outer(x[t], x[t])
    assert rel(ref.covariance_update(x, mask=mask), cov) < 1e-6
    grads = [sum(torch.outer(gy[t], x[t]) for t in range(T) if seg[t] == n) for n in range(5)]
    fvp = sum(gn * (gn * V).sum() for gn in grads)
    assert rel(ref.linear_fisher_vp(x, gy, V, segment_ids=seg), fvp) < 1e-6
    assert rel(ref.linear_fisher_diag(x, gy, segment_ids=seg), sum(gn * gn for gn in grads)) < 1e-6
    token_grads = [torch.outer(gy[t], x[t]) for t in range(T)]
    assert rel(ref.linear_fisher_diag(x, gy), sum(gn * gn for gn in token_grads)) < 1e-6
    assert rel(ref.linear_fisher_vp(x, gy, V), sum(gn * (gn * V).sum() for gn in token_grads)) < 1e-6
    QA, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    QG, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))
    scale = torch.rand(d_out, d_in, generator=g, dtype=torch.float64)
    loop = torch.zeros(d_out, d_in, dtype=torch.float64)
    for i in range(d_out):
        for j in range(d_in):
            u = torch.outer(QG[:, i], QA[:, j])
            loop += scale[i, j] * (u * V).sum() * u
    assert rel(ref.kron_eigen_apply(V, QA, QG, scale), loop) < 1e-6


# ---------------------------------------------------------------- op 1
@pytest.mark.parametrize("backend,dtype", backend_params())
@pytest.mark.parametrize("T,d_in,d_out", SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "random", "zeros"])
def test_covariance_update(backend, dtype, T, d_in, d_out, mask_kind):
    x, _, _, _ = data(T, d_in, d_out, dtype)
    mask = {"none": None, "random": (torch.rand(T, generator=torch.Generator().manual_seed(2)) > 0.3).float(),
            "zeros": torch.zeros(T)}[mask_kind]
    mask = mask.to(DEVICE) if mask is not None else None
    got = covariance_update(x, mask=mask, alpha=0.7, backend=backend)
    want = ref.covariance_update(x, mask=mask, alpha=0.7)
    assert got.dtype == torch.float32 and got.shape == (d_in, d_in)
    assert torch.equal(got, got.T)
    assert close(got, want, tolerance(backend, dtype))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton" or CUDA])
@pytest.mark.parametrize("d", [257, 600, 1031])
def test_covariance_wide_inputs_split_in_blocks(backend, d):
    """Widths past the C++ kernel's 256-column leaf (recursive halves, off-diagonal GEMMs in place), into a fresh
    matrix and accumulated into a contiguous running sum (in place) and a non-contiguous one (the copy path)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(45, d, generator=g).to(DEVICE)
    mask = (torch.rand(45, generator=g) > 0.4).float().to(DEVICE)
    fresh = covariance_update(x, mask=mask, backend=backend)
    assert torch.equal(fresh, fresh.T) and close(fresh, ref.covariance_update(x, mask=mask), 1e-5)
    start = ref.covariance_update(torch.randn(9, d, generator=g).to(DEVICE))
    for out in (start.clone(), start.clone().T):  # symmetric: the transposed view holds the same matrix
        returned = covariance_update(x, out, alpha=0.5, beta=1.0, backend=backend)
        assert returned is out and torch.equal(out, out.T)
        assert close(out, start + 0.5 * ref.covariance_update(x), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_covariance_lower_only_updates_then_one_mirror(backend):
    """``lower_only`` accumulations are right on and below the diagonal; ``mirror_lower_`` makes the sum whole."""
    d = 300 if backend != "triton" or CUDA else 37
    g = torch.Generator().manual_seed(5)
    chunks = [torch.randn(t, d, generator=g).to(DEVICE) for t in (20, 33)]
    out = covariance_update(chunks[0], lower_only=True, backend=backend)
    covariance_update(chunks[1], out, alpha=1.0, beta=1.0, lower_only=True, backend=backend)
    want = ref.covariance_update(torch.cat(chunks))
    assert close(torch.tril(out), torch.tril(want), tolerance(backend, torch.float32))
    assert mirror_lower_(out, backend=backend if backend != "triton" else None) is out
    assert torch.equal(out, out.T) and close(out, want, tolerance(backend, torch.float32))
    lopsided = torch.tril(torch.randn(7, 7, generator=g)).to(DEVICE) + 5 * torch.triu(torch.ones(7, 7), 1).to(DEVICE)
    whole = torch.tril(lopsided) + torch.tril(lopsided, -1).T
    assert torch.equal(mirror_lower_(lopsided.clone(), backend="torch"), whole)
    with pytest.raises(ValueError, match="square float32"):
        mirror_lower_(torch.zeros(3, 4, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_covariance_ema_aliasing_and_noncontiguous(backend):
    x, _, _, _ = data(130, 70, 3, torch.float32)
    wide = torch.randn(70, 130, device=DEVICE).T  # non-contiguous (130, 70) view
    base = torch.randn(70, 70, device=DEVICE)
    out = base @ base.T
    expected = 0.9 * out + 0.1 * ref.covariance_update(wide)
    returned = covariance_update(wide, out, alpha=0.1, beta=0.9, backend=backend)
    assert returned is out  # in place
    assert close(out, expected, tolerance(backend, torch.float32))
    assert close(covariance_update(x[::2], backend=backend), ref.covariance_update(x[::2]),
                 tolerance(backend, torch.float32))


# ---------------------------------------------------------------- op 2
@pytest.mark.parametrize("backend,dtype", backend_params())
@pytest.mark.parametrize("T,d_in,d_out", SHAPES)
@pytest.mark.parametrize("segmented", [False, True])
def test_linear_fisher_vp(backend, dtype, T, d_in, d_out, segmented):
    x, gy, V, seg = data(T, d_in, d_out, dtype)
    seg = seg if segmented else None
    got = linear_fisher_vp(x, gy, V, segment_ids=seg, backend=backend)
    want = ref.linear_fisher_vp(x, gy, V, segment_ids=seg)
    assert got.dtype == torch.float32 and got.shape == (d_out, d_in)
    assert close(got, want, 2 * tolerance(backend, dtype))


# ---------------------------------------------------------------- op 3
@pytest.mark.parametrize("backend,dtype", backend_params())
@pytest.mark.parametrize("T,d_in,d_out", SHAPES)
@pytest.mark.parametrize("segmented", [False, True])
def test_linear_fisher_diag(backend, dtype, T, d_in, d_out, segmented):
    x, gy, _, seg = data(T, d_in, d_out, dtype)
    seg = seg if segmented else None
    got = linear_fisher_diag(x, gy, segment_ids=seg, backend=backend)
    want = ref.linear_fisher_diag(x, gy, segment_ids=seg)
    assert got.dtype == torch.float32 and got.shape == (d_out, d_in) and bool((got >= 0).all())
    assert close(got, want, tolerance(backend, dtype))


@pytest.mark.parametrize("backend,dtype", backend_params())
@pytest.mark.parametrize("T,d_in,d_out", SHAPES[1:])
def test_fisher_ops_offsets_equal_segment_ids(backend, dtype, T, d_in, d_out):
    """The examples as token ranges (``offsets``, with empty ranges between them: rows without tokens) give what
    the same examples as sorted ids give, for both Fisher ops."""
    x, gy, V, seg = data(T, d_in, d_out, dtype)
    counts = torch.bincount(seg.cpu())
    lengths = torch.stack([counts, torch.zeros_like(counts)], 1).reshape(-1)  # an empty range after each example
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(DEVICE)
    got = linear_fisher_diag(x, gy, offsets=offsets, backend=backend)
    assert close(got, ref.linear_fisher_diag(x, gy, segment_ids=seg), tolerance(backend, dtype))
    got = linear_fisher_vp(x, gy, V, offsets=offsets, backend=backend)
    assert close(got, ref.linear_fisher_vp(x, gy, V, segment_ids=seg), 2 * tolerance(backend, dtype))


def test_fisher_ops_bad_offsets():
    x, gy = torch.randn(5, 3), torch.randn(5, 2)
    with pytest.raises(ValueError, match="not both"):
        linear_fisher_diag(x, gy, segment_ids=torch.zeros(5, dtype=torch.long), offsets=torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="int32 or int64"):
        linear_fisher_diag(x, gy, offsets=torch.tensor([0.0, 5.0]))
    with pytest.raises(ValueError, match=r"shape \(N \+ 1,\)"):
        linear_fisher_diag(x, gy, offsets=torch.zeros(0, dtype=torch.long))
    for bad in ([0, 4], [1, 5], [0, 3, 2, 5]):
        with pytest.raises(ValueError, match="from 0 to the 5 tokens"):
            linear_fisher_diag(x, gy, offsets=torch.tensor(bad))
        with pytest.raises(ValueError, match="from 0 to the 5 tokens"):
            linear_fisher_vp(x, gy, torch.randn(2, 3), offsets=torch.tensor(bad))
    with pytest.raises(ValueError, match="num_segments comes with segment_ids"):
        linear_fisher_vp(x, gy, torch.randn(2, 3), offsets=torch.tensor([0, 5]), num_segments=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fisher_ops_noncontiguous(backend):
    x, gy, V, seg = data(63, 17, 33, torch.float32)
    xt = x.T.contiguous().T
    gyt = gy.T.contiguous().T
    tol = tolerance(backend, torch.float32)
    assert close(linear_fisher_diag(xt, gyt, segment_ids=seg, backend=backend),
                 ref.linear_fisher_diag(x, gy, segment_ids=seg), tol)
    assert close(linear_fisher_vp(xt, gyt, V.T.contiguous().T, segment_ids=seg, backend=backend),
                 ref.linear_fisher_vp(x, gy, V, segment_ids=seg), 2 * tol)


# ---------------------------------------------------------------- op 4
@pytest.mark.parametrize("backend,dtype", backend_params())
@pytest.mark.parametrize("T,d_in,d_out", SHAPES)
def test_kron_eigen_apply(backend, dtype, T, d_in, d_out):
    _, _, V, _ = data(T, d_in, d_out, dtype)
    g = torch.Generator().manual_seed(3)
    QA = torch.linalg.qr(torch.randn(d_in, d_in, generator=g))[0].to(DEVICE)
    QG = torch.linalg.qr(torch.randn(d_out, d_out, generator=g))[0].to(DEVICE)
    scale = torch.rand(d_out, d_in, generator=g).to(DEVICE)
    got = kron_eigen_apply(V, QA.T.contiguous().T, QG, scale, backend=backend)
    want = ref.kron_eigen_apply(V, QA, QG, scale)
    assert got.dtype == torch.float32
    assert close(got, want, tolerance(backend, dtype))


@pytest.mark.parametrize("backend,dtype", backend_params())
@pytest.mark.parametrize("batch,d_in,d_out", [(1, 1, 1), (3, 33, 5), (2, 17, 40)])
def test_kron_eigen_apply_batched_equals_each_matrix(backend, dtype, batch, d_in, d_out):
    g = torch.Generator().manual_seed(batch)
    V = torch.randn(batch, d_out, d_in, generator=g).to(DEVICE, dtype)
    QA = torch.linalg.qr(torch.randn(batch, d_in, d_in, generator=g))[0].to(DEVICE)
    QG = torch.linalg.qr(torch.randn(batch, d_out, d_out, generator=g))[0].to(DEVICE)
    scale = torch.rand(batch, d_out, d_in, generator=g).to(DEVICE)
    got = kron_eigen_apply(V, QA, QG, scale, backend=backend)
    assert got.shape == (batch, d_out, d_in) and got.dtype == torch.float32
    for i in range(batch):
        assert close(got[i], ref.kron_eigen_apply(V[i], QA[i], QG[i], scale[i]), tolerance(backend, dtype))


def test_kron_eigen_apply_batched_bad_input():
    V, Q = torch.randn(2, 3, 3), torch.eye(3).expand(2, 3, 3)
    with pytest.raises(ValueError, match="QA must be 3-D with 2 matrices"):
        kron_eigen_apply(V, torch.eye(3), Q, torch.ones(2, 3, 3))
    with pytest.raises(ValueError, match="QG must be 3-D with 2 matrices"):
        kron_eigen_apply(V, Q, torch.eye(3).expand(3, 3, 3), torch.ones(2, 3, 3))
    with pytest.raises(ValueError, match=r"scale\[0\] has 3 columns, expected 2"):
        kron_eigen_apply(torch.randn(2, 3, 2), torch.eye(2).expand(2, 2, 2), Q, torch.ones(2, 3, 3))


# ---------------------------------------------------------------- dispatch and input checks
def test_dispatch_and_bad_input():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="backend"):
        covariance_update(x, backend="cuda")
    with pytest.raises(ValueError, match="2-D"):
        covariance_update(torch.randn(5))
    with pytest.raises(TypeError, match="floating"):
        covariance_update(torch.ones(5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="out must be"):
        covariance_update(x, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="sorted"):
        linear_fisher_diag(x, torch.randn(5, 2), segment_ids=torch.tensor([0, 1, 0, 1, 1]))
    with pytest.raises(ValueError, match="rows"):
        linear_fisher_vp(x, torch.randn(4, 2), torch.randn(2, 3))
    with pytest.raises(ValueError, match="QA has 2 rows, expected 3"):
        kron_eigen_apply(torch.randn(2, 3), torch.eye(2), torch.eye(2), torch.ones(2, 3))


# ---------------------------------------------------------------- the top-level name `kernels`
def test_checkout_folder_leaves_top_level_kernels_to_the_installed_package():
    """Python started at the checkout's root finds its ``kernels/`` folder first; the top-level name must still be
    the installed ``kernels`` (Hugging Face's, which transformers imports) so that transformers and the editable
    build work there, and ``curvsafe.kernels`` must still be ours."""
    import subprocess
    import sys
    from importlib.machinery import PathFinder
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = ("import kernels, curvsafe.kernels as ck; print(kernels.__file__); print(ck.__file__); "
            "print(hasattr(ck, 'covariance_update'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    top, ours, has_ops = out.stdout.split()
    assert has_ops == "True" and ours != top
    spec = PathFinder.find_spec("kernels", [p for p in sys.path if Path(p or ".").resolve() != root])
    if spec is None:
        assert Path(top).resolve().parent == root / "kernels"  # nothing else installed: the folder keeps the name
    else:
        assert Path(top).resolve() == Path(spec.origin).resolve()
