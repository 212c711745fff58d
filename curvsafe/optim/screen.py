"""Example screening of :class:`~curvsafe.optim.CurvSafe`: the training examples whose gradient points against safety
leave the step (``CurvSafeSettings.screen``).

Convention. Each training example ``i`` of a step (each row of every micro-batch since the last step) has the
gradient ``G_i`` on the protected blocks: per block the sum over the row's tokens of ``g_t a_t^T`` (the block's
output gradient and input, weight as its (d_out, d_in) matrix; a protected bias gets ``sum_t g_t``). It is exact:
a row's loss reaches a block only through the row's own tokens, so ``sum_i G_i`` is the gradient the backward
accumulated. With ``g`` the safety gradient of the last refresh (the guard's: lower safety loss is safer), the
example's push against safety is the cosine

    ``c_i = -<G_i, g> / (|G_i| |g|)``

(a step on example ``i`` alone raises the safety loss to first order by ``lr * c_i |G_i| |g|``). Examples with
``c_i > threshold`` are screened: their gradients leave the protected parameters' gradient before the wrapped
optimizer's step, at the scale that gradient has by then,

    ``grad <- grad - (|grad| / |sum_i G_i|) sum_{screened} G_i``,

so gradient clipping, AMP's unscaling and the loss's reduction (a uniform factor on the whole gradient) apply to
what is left as to the whole. Parameters outside the protected blocks keep their gradient.

What it is for: fine-tuning data with harmful examples mixed in. Measured on the testbed's mix attack (10% harmful
compliance pairs; README, **Example screening**): the harmful examples' cosines sit far above the task examples',
and screening at 0.05 left out most harmful examples and about 1% of the task's. It does nothing against the drift
that the task's own examples cause (the projection and the guard are for that). The threshold is a cosine whose
scale depends on the model and data: :attr:`ExampleScreen.cosines` holds the last step's ``c_i`` (this rank's
examples; ``opt.constraint.screen.cosines``), so a few steps with a threshold no example reaches show where the
data's cosines lie before one is chosen.

Cost and limits: per protected block and training forward, one product of the size of the block's weight gradient (a
batched GEMM with the longer side of the weight last: for a LoRA B, whose input is the rank, that measured 1.65-3.5x
faster on CPU up to 512 outputs, and from 13% slower to 14% faster at 1376 and 4096), and at the step, per example,
a dot product and a squared norm. The per-example gradients are held until the step: examples per step x protected
parameters floats (float32, or the parameters' wider dtype): a LoRA adapter's parameters times the rows per step, so
it is not meant for full fine-tunes of large layers. Examples are captured in forwards with gradients enabled and
the block in training mode (CurvSafe's own safety passes run in eval mode, so they are not); the rows of one call of
the model given to CurvSafe are one set of examples (a sub-module called on its own does not start a new set). Under
DDP and FSDP2 each rank screens its own rows against the whole safety gradient (CurvSafe's guard holds it whole on
every rank); the counts and the sums of the screened and of all per-example gradients go through one all-reduce per
step (whole, adapter-sized), and under FSDP2 the gradient's shards through one all-gather; each rank then takes its
part of the screened rows' sum off its shard. Not tested with gradient checkpointing (the captured inputs are held
until the backward, which undoes its saving). When the captured examples do not add up to the gradient
(:meth:`ExampleScreen.apply`), the step is not screened and CurvSafe warns once.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor, nn

from ..capture import LinearBlock
from ..curvature.distributed import all_reduce_sum_
from ..curvature.sharded import gather_whole, is_sharded, local_part


def example_gradient(block: LinearBlock, inputs: Tensor, output_grad: Tensor, *, transposed: bool = False
                     ) -> tuple[Tensor, Optional[Tensor]]:
    """Per-example gradients of ``block`` from one call: the weight's as (rows, d_out, d_in) matrices ((rows, d_in,
    d_out) with ``transposed``) and, when the block has a protected bias, the bias's (rows, d_out), in float32 or
    wider. ``inputs`` (rows, [tokens,] d_in), ``output_grad`` (rows, [tokens,] d_out): the rows of a batch as the
    model sees them, padding included (its output gradient is zero), so no regrouping as in
    :func:`~curvsafe.curvature.sequence_grads.sequence_gradients`, whose tokens come flattened and masked."""
    dtype = torch.promote_types(torch.promote_types(inputs.dtype, output_grad.dtype), torch.float32)
    rows = inputs.shape[0]
    a = inputs.to(dtype).reshape(rows, -1, block.d_in)
    g = output_grad.to(dtype).reshape(rows, -1, block.d_out)
    weight = torch.bmm(a.transpose(1, 2), g) if transposed else torch.bmm(g.transpose(1, 2), a)
    return weight, (g.sum(1) if block.bias_name is not None else None)


_ADDS_UP = 0.999  # the least cosine between the gradient and the captured examples' sum that counts as equal


class ExampleScreen:
    """Captures the per-example gradients of the protected blocks in training forwards and screens the examples
    that push against safety (module docstring).

    Args:
        model: the model whose forwards are captured (unwrapped: its forward pre-hook counts the passes).
        blocks: the protected blocks.
        threshold: the cosine above which an example is screened (``0 <= threshold < 1``).
    """

    def __init__(self, model: nn.Module, blocks: list[LinearBlock], threshold: float):
        self.blocks = blocks
        self.threshold = threshold
        # each weight's per-example gradients are computed with the longer side last (example_gradient's
        # ``transposed`` when d_out > d_in) and kept so; _flipped: the names kept transposed to their parameter
        self._in_out = {b.weight_name: b.d_out > b.d_in for b in blocks}
        self._flipped = {b.weight_name for b in blocks if (b.d_out > b.d_in) != (b.kind == "conv1d")}
        self._pass = 0  # forwards of the model so far: the rows of one pass are one set of examples
        self._grads: dict[int, dict[str, Tensor]] = {}  # pass -> parameter name -> per-example gradients
        self.mismatch = False  # the last apply() found the captured examples not adding up to the gradient
        self.cosines = torch.zeros(0)  # the last apply()'s c_i of this rank's examples (to choose a threshold)
        self._ref = ref = weakref.ref(self)  # the hooks must not keep a discarded optimizer's screen alive
        self._handles = [model.register_forward_pre_hook(lambda *_: _call(ref, "_count"))]
        self._handles += [b.module.register_forward_hook(_capture_hook(ref, b)) for b in blocks]

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles, self._grads = [], {}

    def __del__(self):
        try:
            self.remove()
        except Exception:  # interpreter shutdown: the model may be gone first
            pass

    def _count(self) -> None:
        self._pass += 1

    def _capture(self, block: LinearBlock, module: nn.Module, inputs: tuple, output) -> None:
        """Forward hook: on a training forward with gradients, the output gradient's hook adds this call's
        per-example gradients to the pass's."""
        if not (module.training and torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
            return
        x, key, ref = inputs[0].detach(), self._pass, self._ref

        def on_grad(grad: Tensor) -> None:
            screen = ref()
            if screen is not None:
                screen._add(block, key, x, grad.detach())

        output.register_hook(on_grad)

    def _add(self, block: LinearBlock, key: int, x: Tensor, grad: Tensor) -> None:
        weight, bias = example_gradient(block, x, grad, transposed=self._in_out[block.weight_name])
        entries = self._grads.setdefault(key, {})
        for name, value in ((block.weight_name, weight), (block.bias_name, bias)):
            if value is not None:  # a block called twice in one forward: its examples' gradients are the sums
                entries[name] = entries[name] + value if name in entries else value

    def clear(self) -> None:
        """Forget the captured examples (the gradients were discarded: ``zero_grad``)."""
        self._grads = {}

    @property
    def pending(self) -> int:
        """Examples captured since the last :meth:`apply` or :meth:`clear`."""
        return sum(next(iter(e.values())).shape[0] for e in self._grads.values() if e)

    def _stored(self, name: str, tensor: Tensor) -> Tensor:
        """``tensor`` in ``name``'s parameter layout as the screen keeps that name's per-example gradients, or back
        (the same transpose)."""
        return tensor.T if name in self._flipped else tensor

    def apply(self, params: dict[str, Tensor], safety_grad: dict[str, Tensor]) -> tuple[int, int]:
        """Screen the examples captured since the last call against ``safety_grad`` (by parameter name) and remove
        their gradients from ``params``' ``.grad`` (module docstring); returns ``(screened, examples)`` over all
        ranks. Every rank must call it (DDP, FSDP2).

        When the captured examples do not add up to the gradient (its direction differs from ``sum_i G_i``: a step
        a GradScaler skipped left its examples behind while the model's ``zero_grad`` cleared the gradient, or
        gradients changed per parameter, as by ``clip_grad_value_``), nothing is screened this step and
        ``mismatch`` is set."""
        sharded = any(is_sharded(p) for p in params.values())  # FSDP2: the gradients are the ranks' shards
        passes, self._grads = self._grads, {}
        self.mismatch = False
        names = [n for n in params if n in safety_grad]
        if not names:
            return 0, 0
        device = next(iter(params.values())).device
        dtype = torch.promote_types(next(iter(params.values())).dtype, torch.float32)
        target = {n: self._stored(n, safety_grad[n].to(dtype)).reshape(-1) for n in names}  # g, as the examples
        target_norm = torch.stack([t.square().sum() for t in target.values()]).sum().sqrt()
        full = {n: torch.zeros(params[n].numel(), dtype=dtype, device=device) for n in names}  # sum_i G_i
        dropped = {n: torch.zeros_like(f) for n, f in full.items()}  # the screened rows' sum
        counts = torch.zeros(2, dtype=torch.float64, device=device)  # screened, examples
        cosines = []
        while passes:  # each pass's per-example gradients are freed once screened
            entries = passes.pop(next(iter(passes)))
            rows = next(iter(entries.values())).shape[0]
            flats = {n: entries[n].reshape(rows, -1).to(dtype) for n in names if n in entries}
            del entries
            dots = torch.zeros(rows, dtype=dtype, device=device)
            squares = torch.zeros_like(dots)
            for n, f in flats.items():
                dots += f @ target[n]
                squares += f.square().sum(1)
            cos = -dots / (squares.sqrt() * target_norm).clamp_min(torch.finfo(dtype).tiny)
            drop = (cos > self.threshold) & (squares > 0)
            cosines.append(cos.detach().cpu())
            counts += torch.stack([drop.sum(), torch.tensor(rows, device=device)]).to(torch.float64)
            any_dropped = bool(drop.any())
            for n, f in flats.items():
                full[n] += f.sum(0)
                if any_dropped:
                    dropped[n] += f[drop].sum(0)
        self.cosines = torch.cat(cosines) if cosines else torch.zeros(0)
        all_reduce_sum_([counts, *full.values(), *dropped.values()])
        screened, examples = (int(v) for v in counts.tolist())
        held = [n for n in names if params[n].grad is not None]
        if examples == 0 or not held:
            return 0, examples
        grads = [params[n].grad for n in held]
        if sharded:  # the whole gradients (one all-gather), as every rank holds them under DDP
            grads = gather_whole([params[n] for n in held], [g.to_local() for g in grads])
        grad = torch.cat([self._stored(n, g).reshape(-1).to(dtype) for n, g in zip(held, grads)])
        parts = torch.cat([full[n] for n in held])
        norms = (float(grad.norm()), float(parts.norm()))
        if norms[1] == 0.0:
            return 0, examples
        if float(grad @ parts) < _ADDS_UP * norms[0] * norms[1]:
            self.mismatch = True
            return 0, examples
        if screened:
            scale = norms[0] / norms[1]
            with torch.no_grad():
                for n, g in zip(held, grads):  # the screened rows' share, whole, in the parameter's layout
                    removed = self._stored(n, scale * dropped[n].view(self._stored(n, g).shape))
                    gr = params[n].grad
                    if sharded:  # each rank takes its part off its shard
                        gr.to_local().sub_(local_part(params[n], removed).to(gr.dtype))
                    else:
                        gr.sub_(removed.to(gr.dtype))
        return screened, examples


def _call(ref: weakref.ref, method: str) -> None:
    screen = ref()
    if screen is not None:
        getattr(screen, method)()


def _capture_hook(ref: weakref.ref, block: LinearBlock):
    def hook(module, inputs, output):
        screen = ref()
        if screen is not None:
            screen._capture(block, module, inputs, output)
    return hook

