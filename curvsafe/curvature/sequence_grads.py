"""Per-sequence gradients of a linear block and the sum of their squares in a Kronecker eigenbasis.

Convention: the rows of ``a`` (T, d_in, the block's inputs) and ``g`` (T, d_out, the loss gradients w.r.t. its
outputs) are tokens, grouped into sequences (the batch's rows, :class:`Segments`); the gradient of sequence n is
``grad_n = sum_{t in n} g_t a_t^T`` (d_out, d_in), and EK-FAC's correction needs ``sum_n (QG^T grad_n QA)^2``.

Two orders give that sum (equal up to float32 rounding):

- by token: rotate every token (``a QA``, ``g QG``) and let the fused
  :func:`~curvsafe.kernels.linear_fisher_diag` form each rotated gradient in registers,
  ``T (d_in k_in + d_out k_out + k_out k_in)`` multiply-adds;
- by sequence: form the gradients (``T d_out d_in``) and rotate each (``N d_out k_in (d_in + k_out)``).

The second wins when one side is narrow (a LoRA matrix, whose one side is the rank r) and sequences are longer
than r; the first for wide layers. :func:`prefer_sequences` compares the two.

The grouping comes as :class:`Segments`, built once per batch with one read of the rows' lengths from the device:
every function here then runs on what the host already knows (shapes, lengths), so finding the grouping waits for
the device once per batch, not several times per block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..kernels import linear_fisher_diag

_CHUNK_BYTES = 1 << 25  # per-sequence gradients formed at once by rotated_fisher_diag (32 MiB)


@dataclass(frozen=True)
class Segments:
    """A batch's counted tokens grouped by row, rows in order and tokens row-major (as the capture hooks deliver
    them); rows without tokens keep their place with length 0.

    Attributes:
        lengths: each row's token count, on the host.
        ids: (T,) long, the row of each token (non-decreasing).
        positions: (T,) long, each token's index among its row's tokens.
        offsets: (rows + 1,) long, ``[0, cumsum(lengths)]``: row n's tokens are ``offsets[n]:offsets[n + 1]``
            (flash-attention's ``cu_seqlens``).
        kept: (sequences,) long, the rows with tokens; None when every row has some.
    """

    lengths: tuple[int, ...]
    ids: Tensor
    positions: Tensor
    offsets: Tensor
    kept: Optional[Tensor]

    @classmethod
    def from_lengths(cls, lengths: Tensor) -> "Segments":
        """From the rows' token counts, (rows,) integer on the batch's device: read to the host here (the one wait
        for the device), everything else derived from them without another."""
        host = tuple(int(n) for n in lengths.tolist())
        device, total = lengths.device, sum(host)
        lengths = lengths.long()
        offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
        ids = torch.repeat_interleave(torch.arange(len(host), device=device), lengths, output_size=total)
        positions = torch.arange(total, device=device) - offsets[:-1][ids]
        kept = None if all(host) else torch.tensor([i for i, n in enumerate(host) if n], device=device)
        return cls(host, ids, positions, offsets, kept)

    @classmethod
    def empty(cls) -> "Segments":
        zero = torch.zeros(0, dtype=torch.long)
        return cls((), zero, zero, torch.zeros(1, dtype=torch.long), None)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def sequences(self) -> int:
        """Rows with at least one token."""
        return sum(1 for n in self.lengths if n)

    @property
    def max_length(self) -> int:
        return max(self.lengths, default=0)

    def row_range(self, first: int, stop: int) -> tuple[int, int, "Segments"]:
        """The tokens ``[lo, hi)`` of rows ``first .. stop - 1`` and their grouping (rows renumbered from 0)."""
        lo, hi = sum(self.lengths[:first]), sum(self.lengths[:stop])
        lengths = self.lengths[first:stop]
        kept = None
        if not all(lengths):  # the parent's kept rows in the range: a slice of them (no copy from the host)
            before = sum(1 for n in self.lengths[:first] if n)
            kept = self.kept[before:before + sum(1 for n in lengths if n)] - first
        return lo, hi, Segments(lengths, self.ids[lo:hi] - first, self.positions[lo:hi],
                                self.offsets[first:stop + 1] - lo, kept)

    def with_tokens(self, per_row: Tensor) -> Tensor:
        """The rows of ``per_row`` (rows, ...) that have tokens."""
        return per_row if self.kept is None else per_row.index_select(0, self.kept)


def prefer_sequences(tokens: int, sequences: int, d_in: int, d_out: int, k_in: int, k_out: int) -> bool:
    """Whether forming and rotating per-sequence gradients costs fewer multiply-adds than rotating tokens."""
    by_token = tokens * (d_in * k_in + d_out * k_out + k_out * k_in)
    by_sequence = tokens * d_out * d_in + sequences * d_out * k_in * (d_in + k_out)
    return by_sequence < by_token


def sequence_gradients(a: Tensor, g: Tensor, segments: Segments) -> Tensor:
    """``grad_n`` of every row of ``segments``, (rows, d_out, d_in) float32 (zeros for a row without tokens).
    Sequences are padded to the longest, one batched GEMM."""
    length = max(segments.max_length, 1)
    a_pad = a.new_zeros((segments.rows, length, a.shape[1]), dtype=torch.float32)
    g_pad = g.new_zeros((segments.rows, length, g.shape[1]), dtype=torch.float32)
    a_pad[segments.ids, segments.positions] = a.float()
    g_pad[segments.ids, segments.positions] = g.float()
    return g_pad.mT @ a_pad


def sequence_sums(g: Tensor, segments: Segments) -> Tensor:
    """``sum_{t in n} g_t`` of every row (rows, d) float32: a bias's per-sequence gradients (rows without tokens are
    zeros, which add nothing to a sum of squares)."""
    out = g.new_zeros((segments.rows, g.shape[1]), dtype=torch.float32)
    return out.index_add_(0, segments.ids, g.float())


def gradient_bytes(blocks, rows: int) -> int:
    """The float32 bytes of ``rows`` sequences' gradients of ``blocks`` (weights and biases): what a one-pass
    EK-FAC fit keeps at most."""
    return 4 * rows * sum(b.d_out * b.d_in + (b.d_out if b.bias_name else 0) for b in blocks)


def rotated_square_sum(grads: Tensor, QA: Tensor, QG: Tensor) -> Tensor:
    """``sum_n (QG^T grads_n QA)^2`` (k_out, k_in) of gradients stacked as (N, d_out, d_in)."""
    return (QG.mT @ (grads @ QA)).square().sum(0)


def rotated_fisher_diag(a: Tensor, g: Tensor, QA: Tensor, QG: Tensor, segments: Segments) -> Tensor:
    """``sum_n (QG^T grad_n QA)^2`` (k_out, k_in) float32 for ``QA`` (d_in, k_in) and ``QG`` (d_out, k_out), in
    the cheaper order (module docstring); per-sequence gradients at most 32 MiB at a time."""
    T, d_in = a.shape
    d_out, k_in, k_out = g.shape[1], QA.shape[1], QG.shape[1]
    a, g = a.float(), g.float()
    if not prefer_sequences(T, segments.sequences, d_in, d_out, k_in, k_out):
        return linear_fisher_diag(a @ QA, g @ QG, offsets=segments.offsets)
    per_chunk = max(1, _CHUNK_BYTES // (4 * d_out * d_in + 4 * segments.max_length * (d_in + d_out)))
    out = a.new_zeros(k_out, k_in)
    for first in range(0, segments.rows, per_chunk):
        lo, hi, part = segments.row_range(first, first + per_chunk)
        out.add_(rotated_square_sum(sequence_gradients(a[lo:hi], g[lo:hi], part), QA, QG))
    return out
