"""Robust symmetric eigendecomposition for Kronecker factors."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from .vectors import host_floats


def _check_finite(matrix: Tensor, name: str) -> None:
    if not bool(torch.isfinite(matrix).all()):
        raise FloatingPointError(f"factor {name} has non-finite entries; refusing to eigendecompose it")


def safe_eigh(matrix: Tensor, name: str, *, retries: int = 4) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending, clamped at 0) and eigenvectors (columns, row-major storage) of a PSD factor, in
    float32.

    Computed in float64 on the symmetrised matrix. Non-finite entries raise ``FloatingPointError`` naming the
    factor (kronfluence's ``eigh`` of a NaN factor fails obscurely); if LAPACK does not converge, the decomposition
    is retried with a growing diagonal jitter (relative to the mean eigenvalue) that is subtracted again.
    """
    _check_finite(matrix, name)
    m = matrix.double()
    m = 0.5 * (m + m.T)
    scale = float(m.diagonal().abs().mean()) or 1.0
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    for attempt in range(retries + 1):
        jitter = 0.0 if attempt == 0 else scale * 10.0 ** (attempt - 10)
        try:
            vals, vecs = torch.linalg.eigh(m + jitter * eye)
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            continue
        return (vals - jitter).clamp_min(0).float(), vecs.float().contiguous()
    raise FloatingPointError(f"eigh of factor {name} did not converge after {retries} jittered retries")


_BATCH_BYTES = 1 << 25  # per batched call: large factors go one by one (the float64 copies are the transient)


def first_equal(matrices: Mapping[str, Tensor]) -> dict[str, str]:
    """Each name of ``matrices`` -> the name of the first matrix equal to it (itself when none comes before), so
    equal factors (the input factors of q/k/v, which see one input) are decomposed once. Compared in full, among
    matrices of the same shape, dtype, device, sum and trace."""
    seen: dict[tuple, list[str]] = {}  # fingerprint -> the distinct names so far
    first: dict[str, str] = {}
    sums = host_floats([s for m in matrices.values() for s in (m.sum(), m.diagonal().sum())])
    for (name, m), total, trace in zip(matrices.items(), sums[::2], sums[1::2]):
        candidates = seen.setdefault((tuple(m.shape), m.dtype, m.device, total, trace), [])
        twin = next((other for other in candidates if torch.equal(matrices[other], m)), None)
        if twin is None:
            candidates.append(name)
        first[name] = twin or name
    return first


def safe_eigh_many(matrices: Mapping[str, Tensor], *, dtype: torch.dtype = torch.float64,
                   consume: bool = False) -> dict[str, tuple[Tensor, Tensor]]:
    """:func:`safe_eigh` of many factors at once: same result per matrix, batched ``eigh`` calls per size.

    ``dtype`` is the precision of the decomposition (float64 as :func:`safe_eigh`; float32 is about a quarter
    faster on CPU and resolves eigenvalues down to ~1e-6 of the largest, enough where tiny ones do not matter).

    Equal matrices (e.g. the input factors of ``q``/``k``/``v`` LoRA-A blocks, which see the same input) are
    decomposed once and share the result tensors. A batch that
    LAPACK cannot decompose falls back to :func:`safe_eigh` matrix by matrix (jittered retries).
    Batches are capped at 32 MiB, so the transient copies of a large factor are those of one matrix.

    With ``consume`` (``matrices`` then a mutable mapping), each matrix leaves ``matrices`` once it is decomposed
    (an equal one as soon as it is found equal): where ``matrices`` holds the only references, the factors and
    their bases are never all alive at once.
    """
    unique = first_equal(matrices)  # name -> name of the first equal matrix
    groups: dict[tuple, list[str]] = {}  # (shape, dtype, device) -> names of distinct matrices
    for name, first in unique.items():
        if first == name:
            m = matrices[name]
            groups.setdefault((tuple(m.shape), m.dtype, m.device), []).append(name)
    if consume:
        for name in [n for n, first in unique.items() if first != n]:
            del matrices[name]
    result: dict[str, tuple[Tensor, Tensor]] = {}
    chunks = []  # at most ~32 MiB per batched call: large factors go one by one
    width = torch.finfo(dtype).bits // 8
    for (shape, _, _), names in groups.items():
        per_call = max(1, _BATCH_BYTES // (width * shape[0] * shape[0]))
        chunks += [names[i:i + per_call] for i in range(0, len(names), per_call)]
    for names in chunks:
        result.update(_eigh_chunk(matrices, names, dtype))
        if consume:
            for n in names:
                del matrices[n]
    return {name: result[first] for name, first in unique.items()}


def _eigh_chunk(matrices: Mapping[str, Tensor], names: list[str], dtype: torch.dtype
                ) -> dict[str, tuple[Tensor, Tensor]]:
    """One batched ``eigh`` of the equal-sized ``matrices[names]`` (:func:`safe_eigh_many`)."""
    stack = torch.stack([matrices[n] for n in names])
    if not bool(torch.isfinite(stack).all()):
        for n in names:
            _check_finite(matrices[n], n)
    m = stack.to(dtype)
    try:
        vals, vecs = torch.linalg.eigh(0.5 * (m + m.transpose(-1, -2)))
    except RuntimeError:  # some matrix did not converge: the guarded path, one by one
        return {n: safe_eigh(matrices[n], n) for n in names}
    vals, vecs = vals.clamp_min(0).float(), vecs.float()
    return {n: (vals[i], vecs[i].contiguous()) for i, n in enumerate(names)}
