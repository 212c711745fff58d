"""Block-diagonal exact empirical Fisher of the linear blocks, from stored layer inputs and output gradients.

Convention: the empirical Fisher of :mod:`.hvp` (sequences are examples, ``(1/K) sum_k (1/N_k) sum_n g_n g_n^T``)
restricted to each block's weight, cross-block terms dropped. ``mv`` needs no forward or backward pass: one pass
at construction records each block's non-padding inputs ``a`` and output gradients ``g``, and every product is the
fused :func:`~curvsafe.kernels.linear_fisher_vp` op (per-example gradients never formed). Memory: the recorded
activations and gradients of every batch. ``inverse_mv`` solves with CG.
"""

from __future__ import annotations

from typing import Iterable, Optional

from torch import Tensor, nn

from ..capture import LinearBlock, ModuleSelection, find_blocks
from ..kernels import linear_fisher_vp
from ._pass import BatchInfo, capture_pass, materialize
from .base import CurvatureOperator
from .loss import CausalLMLoss
from .sequence_grads import Segments
from .vectors import ParamVector


class BlockFisherOperator(CurvatureOperator):
    """Exact per-block empirical Fisher of the weights of the captured linear blocks (module docstring)."""

    def __init__(self, model: nn.Module, batches: Iterable, modules: ModuleSelection = None, *, loss=None,
                 progress: Optional[bool] = None, cg_tol: float = 1e-6):
        self.blocks: list[LinearBlock] = find_blocks(model, modules)
        params = dict(model.named_parameters())
        self.param_shapes = {b.weight_name: params[b.weight_name].shape for b in self.blocks}
        self.cg_tol = cg_tol
        # per batch: {block: (a, g)}, its tokens' grouping by row and 1 / N_k
        self._records: list[tuple[dict[str, tuple[Tensor, Tensor]], Segments, Tensor]] = []  # scale: 0-d, device
        info = BatchInfo()
        inputs: dict[str, Tensor] = {}
        current: dict[str, tuple[Tensor, Tensor]] = {}

        def on_forward(block: LinearBlock, a: Tensor) -> None:
            inputs[block.name] = a

        def on_backward(block: LinearBlock, g: Tensor) -> None:
            current[block.name] = (inputs.pop(block.name), g)

        def on_batch_end() -> None:
            self._records.append((dict(current), info.segments, 1.0 / info.num_loss_tokens.clamp_min(1).double()))
            current.clear()

        capture_pass(model, self.blocks, materialize(batches), loss=loss or CausalLMLoss(), fisher_type="empirical",
                     generator=None, on_forward=on_forward, on_backward=on_backward, info=info,
                     on_batch_end=on_batch_end, desc="block Fisher", progress=progress, verify=False)

    def _mv(self, v: ParamVector) -> ParamVector:
        out: ParamVector = {}
        for b in self.blocks:
            V = b.as_matrix(v[b.weight_name])
            total = None
            for record, seg, scale in self._records:
                a, g = record[b.name]
                part = linear_fisher_vp(a, g, V, offsets=seg.offsets) * scale
                total = part if total is None else total.add_(part)
            out[b.weight_name] = b.from_matrix(total / len(self._records))
        return out

    def _inverse_mv(self, v: ParamVector, damping: float) -> ParamVector:
        from .cg import CGInverse

        return CGInverse(self, tol=self.cg_tol).inverse_mv(v, damping)
