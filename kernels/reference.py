"""Plain PyTorch reference implementations of the four curvature ops.

These are the ground truth for the Triton and C++ kernels and the fallback path on any device. Conventions shared
by every backend (see each op's module for the public entry point):

- ``x`` (T, d_in) are layer inputs, ``gy`` (T, d_out) gradients w.r.t. the layer output, ``V`` (d_out, d_in) is
  shaped like an ``nn.Linear`` weight. Inputs may be fp32, fp16 or bf16 (fp64 is accepted and rounded to fp32);
  every result is fp32 and every accumulation happens in fp32.
- ``segment_ids`` (T,) int64, non-decreasing, values in ``[0, num_segments)``: token t belongs to example
  ``segment_ids[t]``. ``None`` makes every token its own example.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def covariance_update(x: Tensor, out: Optional[Tensor] = None, *, mask: Optional[Tensor] = None,
                      alpha: float = 1.0, beta: float = 0.0, lower_only: bool = False) -> Tensor:
    """``beta * out + alpha * x^T diag(mask) x`` (d, d) fp32, exactly symmetric; written into ``out`` when given.
    ``lower_only`` is accepted for the kernels' contract (only the lower triangle need be right); the reference
    always computes the whole matrix."""
    xf = x.float()
    xw = xf if mask is None else xf * mask.float()[:, None]
    cov = xw.T @ xf
    cov = 0.5 * (cov + cov.T)
    if out is None:
        return cov.mul_(alpha)
    return out.mul_(beta).add_(cov, alpha=alpha)


def mirror_lower_(m: Tensor) -> Tensor:
    """Copy the strict lower triangle of the square ``m`` onto its upper one, in place: exactly symmetric."""
    lower = torch.tril(m, -1)
    return m.copy_(lower + lower.T + torch.diag_embed(torch.diagonal(m)))


def segment_sums(values: Tensor, segment_ids: Optional[Tensor], num_segments: Optional[int] = None) -> Tensor:
    """Per-token value -> the sum of its example's values, broadcast back to every token of the example."""
    if segment_ids is None:
        return values
    n = int(segment_ids.max().item()) + 1 if num_segments is None else num_segments
    sums = values.new_zeros(n).index_add_(0, segment_ids, values)
    return sums[segment_ids]


def linear_fisher_vp(x: Tensor, gy: Tensor, V: Tensor, *, segment_ids: Optional[Tensor] = None,
                     num_segments: Optional[int] = None) -> Tensor:
    """``sum_n g_n <g_n, V>`` with ``g_n = sum_{t in n} gy_t x_t^T`` (d_out, d_in) fp32, per-example gradients
    never formed."""
    xf, gf, vf = x.float(), gy.float(), V.float()
    s = ((gf @ vf) * xf).sum(dim=1)  # s_t = gy_t . (V x_t)
    c = segment_sums(s, segment_ids, num_segments)
    return (gf * c[:, None]).T @ xf


def segment_bounds(segment_ids: Tensor) -> list[tuple[int, int]]:
    """[start, end) token ranges of the (sorted) segments, empty segments skipped."""
    _, counts = torch.unique_consecutive(segment_ids, return_counts=True)
    ends = torch.cumsum(counts, 0).tolist()
    starts = [0] + ends[:-1]
    return list(zip(starts, ends))


def linear_fisher_diag(x: Tensor, gy: Tensor, *, segment_ids: Optional[Tensor] = None,
                       offsets: Optional[Tensor] = None) -> Tensor:
    """``sum_n g_n * g_n`` elementwise (d_out, d_in) fp32: the diagonal empirical Fisher of a linear layer.

    One example's gradient is formed at a time (d_out x d_in memory), never all of them. The examples are the
    segments of ``segment_ids``, or the token ranges ``offsets[n]:offsets[n + 1]``; neither: every token.
    """
    xf, gf = x.float(), gy.float()
    if segment_ids is None and offsets is None:
        return gf.square().T @ xf.square()
    out = xf.new_zeros(gf.shape[1], xf.shape[1])
    if offsets is not None:
        ends = offsets.tolist()
        bounds = [(s, e) for s, e in zip(ends[:-1], ends[1:]) if e > s]
    else:
        bounds = segment_bounds(segment_ids)
    for start, end in bounds:
        g = gf[start:end].T @ xf[start:end]
        out.addcmul_(g, g)
    return out


def kron_eigen_apply(V: Tensor, QA: Tensor, QG: Tensor, scale: Tensor) -> Tensor:
    """``QG @ ((QG^T V QA) * scale) @ QA^T`` (d_out, d_in) fp32, or of each matrix of a batch (leading dim)."""
    qa, qg = QA.float(), QG.float()
    return qg @ ((qg.mT @ V.float() @ qa) * scale.float()) @ qa.mT
