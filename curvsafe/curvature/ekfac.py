"""EK-FAC: K-FAC's Kronecker eigenbasis with eigenvalues re-fitted to per-example gradients.

Convention: after K-FAC (:mod:`.kfac`) and the eigendecompositions ``A = QA diag(lam_A) QA^T``,
``G = QG diag(lam_G) QG^T``, the corrected eigenvalue of direction (i, j) is

    ``Lambda_ij = (1 / non-padding tokens) * sum over sequences n of (QG^T grad_n QA)_ij^2``

with ``grad_n = sum over the sequence's tokens of g_t a_t^T`` the per-sequence gradient of the sum loss (the
example is a sequence, as in curvlinops and kronfluence; the 1/tokens normalisation gives the scale of the mean
per-token loss, like K-FAC). :mod:`.sequence_grads` computes the sum in the cheaper of two orders per block.

``fit`` takes one pass over the data instead of two when it can: during the factors' pass it keeps every
sequence's gradient (LoRA matrices: ``sequences x r x d`` numbers per block) and rotates them once the basis is
known. It does so when every block is narrow enough that per-sequence gradients are the cheaper order and they all
fit ``max_gradient_bytes``; otherwise (wide layers, much data, the ``type2`` Fisher) a second pass over the same
batches computes the correction. Both give the same eigenvalues up to float32 rounding.
A bias block gets ``(1 / tokens) * sum_n (QG^T gsum_n)^2``. The operator is ``QG (Lambda ∘ (QG^T V QA)) QA^T``.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from ..capture import LinearBlock
from ._pass import BatchInfo, capture_pass, materialize
from .distributed import all_reduce_counts, all_reduce_sum_, is_distributed
from .kfac import KFAC
from .loss import model_device
from .sequence_grads import (gradient_bytes, prefer_sequences, rotated_fisher_diag, rotated_square_sum,
                             sequence_gradients, sequence_sums)

GRADIENT_BYTES = 1 << 28  # default max_gradient_bytes: 256 MiB of per-sequence gradients for a one-pass fit


class EKFAC(KFAC):
    """K-FAC factors plus the eigenvalue correction, fitted in one pass over the batches or two (module
    docstring; ``passes`` says which the last fit took).

    The factors are decomposed in float32 by default (``eigen_dtype``; half the time of float64 on CPU): the
    correction re-fits every eigenvalue in the basis found, so the eigenvalues' float32 resolution (~1e-7 of the
    largest) does not enter the operator, ``Q diag(Lambda) Q^T`` for the basis ``Q`` at hand. What changes is the
    basis within clusters of tiny eigenvalues, which float32 does not resolve: measured on the peers benchmark's
    LoRA model (``benchmarks/peers.py``), the corrected eigenvalues differ from the float64 basis's by 7e-4 and
    the damped inverse by 0.3% at a damping of 0.1x the mean eigenvalue (1% at 0.01x). ``eigen_dtype=torch.float64``
    gives kronfluence's basis."""

    default_eigen_dtype = torch.float32

    def __init__(self, *args, max_gradient_bytes: int = GRADIENT_BYTES, **kwargs):
        """``max_gradient_bytes``: the most per-sequence gradients ``fit`` keeps to correct the eigenvalues in the
        factors' pass (module docstring); 0 always takes a second pass. Other arguments: :class:`KFAC`'s."""
        if kwargs.get("ema_decay") is not None:
            raise ValueError("EKFAC does not support ema_decay (the correction is fitted once per basis)")
        if max_gradient_bytes < 0:
            raise ValueError(f"max_gradient_bytes must be >= 0, got {max_gradient_bytes}")
        super().__init__(*args, **kwargs)
        self.max_gradient_bytes = max_gradient_bytes
        self.corrected: dict[str, Tensor] = {}
        self.corrected_bias: dict[str, Tensor] = {}
        self.passes = 0  # the passes over the data that the last fit took (1 or 2)

    def fit(self, batches: Iterable) -> "EKFAC":
        data = materialize(batches)
        saved = (self.factors, self._sums, self._counts, self._eigen, self.corrected, self.corrected_bias)
        try:
            tap = _SequenceGradients(self) if self._one_pass_fits(data) else None
            self._fit(data, tap=tap)
            one_pass = tap is not None and tap.complete
            if is_distributed():  # every rank takes the same path: one rank's second pass needs every rank's
                (missing,) = all_reduce_counts([float(not one_pass)], model_device(self.model))
                one_pass = missing == 0
            if one_pass:
                self._correct_from(tap)
            else:
                tap = None  # what it kept goes before the second pass
                self.fit_correction(data)
            self.passes = 1 if one_pass else 2
        except BaseException:
            self.factors, self._sums, self._counts, self._eigen, self.corrected, self.corrected_bias = saved
            raise
        return self

    def _one_pass_fits(self, data: list) -> bool:
        """Whether the per-sequence gradients of ``data`` (every row a sequence, at most) fit the budget."""
        if self.fisher_type == "type2" or self.max_gradient_bytes == 0:
            return False
        rows = sum(int(b["input_ids"].shape[0]) for b in data)
        return gradient_bytes(self.blocks, rows) <= self.max_gradient_bytes

    def _correct_from(self, tap: "_SequenceGradients") -> None:
        """The corrected eigenvalues from the gradients that the factors' pass kept."""
        sums, bias_sums = {}, {}
        for block in self.blocks:
            e = self.eigen(block.name)
            total = e.QG.new_zeros(e.QG.shape[1], e.QA.shape[1])
            for grads in tap.grads.pop(block.name):
                total.add_(rotated_square_sum(grads, e.QA, e.QG))
            sums[block.name] = total
            if block.bias_name:
                bias = e.QG.new_zeros(e.QG.shape[1])
                for per_seq in tap.bias.pop(block.name):
                    bias.add_((per_seq @ e.QG).square().sum(0))
                bias_sums[block.name] = bias
        self._set_corrected(sums, bias_sums, tap.tokens)

    def _set_corrected(self, sums: dict[str, Tensor], bias_sums: dict[str, Tensor], tokens: int) -> None:
        all_reduce_sum_([*sums.values(), *bias_sums.values()])
        (count,) = all_reduce_counts([float(tokens)], model_device(self.model))
        self.corrected = {n: s / count for n, s in sums.items()}
        self.corrected_bias = {n: s / count for n, s in bias_sums.items()}

    def fit_correction(self, batches: Iterable) -> "EKFAC":
        """Compute the corrected eigenvalues in the current K-FAC eigenbasis (``fit`` calls this)."""
        self._require_fit()
        data = materialize(batches)
        eig = {b.name: self.eigen(b.name) for b in self.blocks}
        sums: dict[str, Tensor] = {}
        bias_sums: dict[str, Tensor] = {}
        inputs: dict[str, Tensor] = {}
        info = BatchInfo()

        def on_forward(block: LinearBlock, a: Tensor) -> None:
            inputs[block.name] = a

        def on_backward(block: LinearBlock, g: Tensor) -> None:
            e = eig[block.name]
            part = rotated_fisher_diag(inputs.pop(block.name), g, e.QA, e.QG, info.segments)
            sums[block.name] = part if block.name not in sums else sums[block.name].add_(part)
            if block.bias_name:
                b = (sequence_sums(g, info.segments) @ e.QG).square().sum(0)
                bias_sums[block.name] = b if block.name not in bias_sums else bias_sums[block.name].add_(b)

        totals = capture_pass(self.model, self.blocks, data, loss=self.loss, fisher_type=self.fisher_type,
                              generator=self._make_generator(), on_forward=on_forward, on_backward=on_backward,
                              info=info, desc="EK-FAC correction", progress=self.progress, verify=False)
        self._set_corrected(sums, bias_sums, totals.tokens)
        return self

    def _block_scale(self, block: LinearBlock) -> Tensor:
        if block.name not in self.corrected:
            raise RuntimeError("EKFAC has no corrected eigenvalues yet: call .fit(batches) first")
        return self.corrected[block.name]

    def _bias_scale(self, block: LinearBlock) -> Tensor:
        return self.corrected_bias[block.name]

    def curvature_bytes(self) -> int:
        return super().curvature_bytes() + sum(t.numel() * t.element_size() for t in
                                               [*self.corrected.values(), *self.corrected_bias.values()])

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(corrected=self.corrected, corrected_bias=self.corrected_bias)
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.corrected = dict(state["corrected"])
        self.corrected_bias = dict(state["corrected_bias"])



class _SequenceGradients:
    """The factors' pass's second reader: every block's per-sequence gradients (and bias gradients), batch by
    batch, as long as they are the cheaper order for every block (:func:`prefer_sequences`); else it drops them
    and ``complete`` turns False (the fit then takes the second pass). The fit checked the budget beforehand, on
    a bound (every row a sequence)."""

    def __init__(self, ekfac: EKFAC):
        self.complete = True
        self.tokens = 0
        self.inputs: dict[str, Tensor] = {}
        self.grads: dict[str, list[Tensor]] = {b.name: [] for b in ekfac.blocks}
        self.bias: dict[str, list[Tensor]] = {b.name: [] for b in ekfac.blocks if b.bias_name}

    def on_forward(self, block: LinearBlock, a: Tensor) -> None:
        if self.complete:
            self.inputs[block.name] = a

    def on_backward(self, block: LinearBlock, g: Tensor, info: BatchInfo) -> None:
        if not self.complete:
            return
        a = self.inputs.pop(block.name)
        d_out, d_in = g.shape[1], a.shape[1]
        if not prefer_sequences(a.shape[0], info.num_sequences, d_in, d_out, d_in, d_out):
            self._drop()
            return
        self.grads[block.name].append(sequence_gradients(a, g, info.segments))
        if block.bias_name:
            self.bias[block.name].append(sequence_sums(g, info.segments))

    def on_batch_end(self, info: BatchInfo) -> None:
        self.tokens += info.num_tokens
        self.inputs.clear()

    def _drop(self) -> None:
        self.complete = False
        self.inputs, self.grads, self.bias = {}, {}, {}
