"""Per-sequence gradients of a linear block and the sum of their squares in a Kronecker eigenbasis.

Convention: the rows of ``a`` (T, d_in, the block's inputs) and ``g`` (T, d_out, the loss gradients w.r.t. its
outputs) are tokens, grouped into sequences by sorted ``segment_ids``; the gradient of sequence n is
``grad_n = sum_{t in n} g_t a_t^T`` (d_out, d_in), and EK-FAC's correction needs ``sum_n (QG^T grad_n QA)^2``.

Two orders give that sum (equal up to float32 rounding):

- by token: rotate every token (``a QA``, ``g QG``) and let the fused
  :func:`~curvsafe.kernels.linear_fisher_diag` form each rotated gradient in registers,
  ``T (d_in k_in + d_out k_out + k_out k_in)`` multiply-adds;
- by sequence: form the gradients (``T d_out d_in``) and rotate each (``N d_out k_in (d_in + k_out)``).

The second wins when one side is narrow (a LoRA matrix, whose one side is the rank r) and sequences are longer
than r; the first for wide layers. :func:`prefer_sequences` compares the two.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels import linear_fisher_diag

_CHUNK_BYTES = 1 << 25  # per-sequence gradients formed at once by rotated_fisher_diag (32 MiB)


def segments(segment_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Start rows and lengths of the sorted segments (empty ones absent)."""
    _, counts = torch.unique_consecutive(segment_ids, return_counts=True)
    return torch.cumsum(counts, 0) - counts, counts


def prefer_sequences(tokens: int, sequences: int, d_in: int, d_out: int, k_in: int, k_out: int) -> bool:
    """Whether forming and rotating per-sequence gradients costs fewer multiply-adds than rotating tokens."""
    by_token = tokens * (d_in * k_in + d_out * k_out + k_out * k_in)
    by_sequence = tokens * d_out * d_in + sequences * d_out * k_in * (d_in + k_out)
    return by_sequence < by_token


def sequence_gradients(a: Tensor, g: Tensor, segment_ids: Tensor, rows: Optional[int] = None) -> Tensor:
    """``grad_n`` of every segment present, in order, (N, d_out, d_in) float32; with ``rows``, of every id
    ``0 .. rows - 1`` (a batch's rows: zeros for a row without tokens). Sequences are padded to the longest, one
    batched GEMM."""
    if rows is None:
        _, seq = torch.unique_consecutive(segment_ids, return_inverse=True)
        rows = int(seq.max()) + 1
    else:
        seq = segment_ids
    counts = torch.bincount(seq, minlength=rows)
    pos = torch.arange(a.shape[0], device=a.device) - (torch.cumsum(counts, 0) - counts)[seq]
    length = max(int(counts.max()), 1)
    a_pad = a.new_zeros((rows, length, a.shape[1]), dtype=torch.float32)
    g_pad = g.new_zeros((rows, length, g.shape[1]), dtype=torch.float32)
    a_pad[seq, pos] = a.float()
    g_pad[seq, pos] = g.float()
    return g_pad.mT @ a_pad


def sequence_sums(g: Tensor, segment_ids: Tensor) -> Tensor:
    """``sum_{t in n} g_t`` per row id ``0 .. max id`` (rows, d) float32: a bias's per-sequence gradients (rows
    without tokens are zeros, which add nothing to a sum of squares)."""
    out = g.new_zeros((int(segment_ids.max()) + 1, g.shape[1]), dtype=torch.float32)
    return out.index_add_(0, segment_ids, g.float())


def gradient_bytes(blocks, rows: int) -> int:
    """The float32 bytes of ``rows`` sequences' gradients of ``blocks`` (weights and biases): what a one-pass
    EK-FAC fit keeps at most."""
    return 4 * rows * sum(b.d_out * b.d_in + (b.d_out if b.bias_name else 0) for b in blocks)


def rotated_square_sum(grads: Tensor, QA: Tensor, QG: Tensor) -> Tensor:
    """``sum_n (QG^T grads_n QA)^2`` (k_out, k_in) of gradients stacked as (N, d_out, d_in)."""
    return (QG.mT @ (grads @ QA)).square().sum(0)


def rotated_fisher_diag(a: Tensor, g: Tensor, QA: Tensor, QG: Tensor, segment_ids: Tensor) -> Tensor:
    """``sum_n (QG^T grad_n QA)^2`` (k_out, k_in) float32 for ``QA`` (d_in, k_in) and ``QG`` (d_out, k_out), in
    the cheaper order (module docstring); per-sequence gradients at most 32 MiB at a time."""
    T, d_in = a.shape
    d_out, k_in, k_out = g.shape[1], QA.shape[1], QG.shape[1]
    starts, counts = segments(segment_ids)
    a, g = a.float(), g.float()
    if not prefer_sequences(T, counts.numel(), d_in, d_out, k_in, k_out):
        return linear_fisher_diag(a @ QA, g @ QG, segment_ids=segment_ids)
    per_chunk = max(1, _CHUNK_BYTES // (4 * d_out * d_in + 4 * int(counts.max()) * (d_in + d_out)))
    ends = (starts + counts).tolist()
    starts = starts.tolist()
    out = a.new_zeros(k_out, k_in)
    for first in range(0, len(starts), per_chunk):
        lo, hi = starts[first], ends[min(first + per_chunk, len(starts)) - 1]
        out.add_(rotated_square_sum(sequence_gradients(a[lo:hi], g[lo:hi], segment_ids[lo:hi]), QA, QG))
    return out
