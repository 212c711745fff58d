"""EK-FAC: K-FAC's Kronecker eigenbasis with eigenvalues re-fitted to per-example gradients.

Convention: after K-FAC (:mod:`.kfac`) and the eigendecompositions ``A = QA diag(lam_A) QA^T``,
``G = QG diag(lam_G) QG^T``, the corrected eigenvalue of direction (i, j) is

    ``Lambda_ij = (1 / non-padding tokens) * sum over sequences n of (QG^T grad_n QA)_ij^2``

with ``grad_n = sum over the sequence's tokens of g_t a_t^T`` the per-sequence gradient of the sum loss (the
example is a sequence, as in curvlinops and kronfluence; the 1/tokens normalisation gives the scale of the mean
per-token loss, like K-FAC). It is computed without forming per-example gradients by the
:func:`~curvsafe.kernels.linear_fisher_diag` op on the rotated inputs ``a QA`` and gradients ``g QG``.
A bias block gets ``(1 / tokens) * sum_n (QG^T gsum_n)^2``. The operator is ``QG (Lambda ∘ (QG^T V QA)) QA^T``.
"""

from __future__ import annotations

from typing import Iterable

from torch import Tensor

from ..capture import LinearBlock
from ..kernels import linear_fisher_diag
from ._pass import BatchInfo, capture_pass, materialize
from .distributed import all_reduce_counts, all_reduce_sum_
from .kfac import KFAC
from .loss import model_device


class EKFAC(KFAC):
    """K-FAC factors plus the eigenvalue correction; ``fit`` runs both passes over the same batches."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("ema_decay") is not None:
            raise ValueError("EKFAC does not support ema_decay (the correction is fitted once per basis)")
        super().__init__(*args, **kwargs)
        self.corrected: dict[str, Tensor] = {}
        self.corrected_bias: dict[str, Tensor] = {}

    def fit(self, batches: Iterable) -> "EKFAC":
        data = materialize(batches)
        saved = (self.factors, self._sums, self._counts, self._eigen, self.corrected, self.corrected_bias)
        try:
            super().fit(data)
            self.fit_correction(data)
        except BaseException:
            self.factors, self._sums, self._counts, self._eigen, self.corrected, self.corrected_bias = saved
            raise
        return self

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
            inputs[block.name] = a.float() @ eig[block.name].QA

        def on_backward(block: LinearBlock, g: Tensor) -> None:
            g_rot = g.float() @ eig[block.name].QG
            part = linear_fisher_diag(inputs.pop(block.name), g_rot, segment_ids=info.segment_ids)
            sums[block.name] = part if block.name not in sums else sums[block.name].add_(part)
            if block.bias_name:
                per_seq = g_rot.new_zeros(int(info.segment_ids.max()) + 1, g_rot.shape[1])
                per_seq.index_add_(0, info.segment_ids, g_rot)
                b = per_seq.square().sum(0)
                bias_sums[block.name] = b if block.name not in bias_sums else bias_sums[block.name].add_(b)

        totals = capture_pass(self.model, self.blocks, data, loss=self.loss, fisher_type=self.fisher_type,
                              generator=self._make_generator(), on_forward=on_forward, on_backward=on_backward,
                              info=info, desc="EK-FAC correction", progress=self.progress, verify=False)
        all_reduce_sum_([*sums.values(), *bias_sums.values()])
        (tokens,) = all_reduce_counts([float(totals.tokens)], model_device(self.model))
        self.corrected = {n: s / tokens for n, s in sums.items()}
        self.corrected_bias = {n: s / tokens for n, s in bias_sums.items()}
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
