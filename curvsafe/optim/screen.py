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
faster on CPU up to 512 outputs, and from 13% slower to 14% faster at 1376 and 4096), and at the step, per example, a
dot product and a squared norm, and one product of the examples with their 0/1 screening weights for the sums (no rows
are selected, so the step reads the device once: the counts and the checks' sums together). The per-example gradients of
all blocks whose gradient has one shape share one tensor per forward, so the step's scores, sums and checks are a few
batched operations per shape, not per block (a LoRA adapter on every projection has two or three shapes over dozens to
hundreds of blocks; ``benchmarks/screen.py`` times both parts). The per-example gradients are held until the step:
examples per step x protected parameters floats (float32, or the parameters' wider dtype): a LoRA adapter's parameters
times the rows per step, so it is not meant for full fine-tunes of large layers. Examples are captured in forwards with
gradients enabled and the block in training mode (CurvSafe's own safety passes run in eval mode, so they are not); the
rows of one call of the model given to CurvSafe are one set of examples (a sub-module called on its own does not start a
new set). Under DDP and FSDP2 each rank screens its own rows against the whole safety gradient (CurvSafe's guard holds
it whole on every rank); the counts and the sums of the screened and of all per-example gradients go through one
all-reduce per step (whole, adapter-sized), and under FSDP2 the gradient's shards through one all-gather; each rank then
takes its part of the screened rows' sum off its shard. With Hugging Face's gradient checkpointing (reentrant or not)
the steps are those without it, bit for bit (tested); but the blocks' inputs captured in the forward are held until
the backward, which undoes part of its memory saving (not measured). When the captured examples do not add up to the
gradient (:meth:`ExampleScreen.apply`), the step is not screened and CurvSafe warns once.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor, nn

from ..capture import LinearBlock
from ..curvature.distributed import all_reduce_sum_
from ..curvature.sharded import gather_whole, is_sharded, local_part


def add_example_gradients(out: Tensor, inputs: Tensor, output_grad: Tensor, *, transposed: bool = False,
                          first: bool = False) -> None:
    """Add each row's gradient of a linear block's weight from one call to ``out`` (rows, d_out, d_in), or
    (rows, d_in, d_out) with ``transposed``, in ``out``'s dtype (float32 or wider); with ``first``, write it there
    instead (``out`` is uninitialised). ``inputs`` (rows, [tokens,] d_in), ``output_grad`` (rows, [tokens,]
    d_out): the rows of a batch as the model sees them, padding included (its output gradient is zero), so no
    regrouping as in :func:`~curvsafe.curvature.sequence_grads.sequence_gradients`, whose tokens come flattened
    and masked."""
    rows, d_in, d_out = inputs.shape[0], inputs.shape[-1], output_grad.shape[-1]
    a = inputs.to(out.dtype).reshape(rows, -1, d_in)
    g = output_grad.to(out.dtype).reshape(rows, -1, d_out)
    left, right = (a.transpose(1, 2), g) if transposed else (g.transpose(1, 2), a)
    if first:
        torch.bmm(left, right, out=out)
    else:
        out.baddbmm_(left, right)


_ADDS_UP = 0.999  # the least cosine between the gradient and the captured examples' sum that counts as equal


class ExampleScreen:
    """Captures the per-example gradients of the protected blocks in training forwards and screens the examples
    that push against safety (module docstring).

    The per-example gradients of the parameters whose (stored) gradient shape is the same are kept in one tensor
    per pass, ``(parameters, rows, *shape)``, so that the step's scores, sums and checks cost a few operations per
    shape rather than per parameter (a LoRA adapter has two or three shapes over dozens of parameters).

    Args:
        model: the model whose forwards are captured (unwrapped: its forward pre-hook counts the passes).
        blocks: the protected blocks.
        threshold: the cosine above which an example is screened (``0 <= threshold < 1``).
    """

    def __init__(self, model: nn.Module, blocks: list[LinearBlock], threshold: float):
        self.blocks = blocks
        self.threshold = threshold
        # each weight's per-example gradients are computed with the longer side last (add_example_gradients'
        # ``transposed`` when d_out > d_in) and kept so; _flipped: the names kept transposed to their parameter
        self._in_out = {b.weight_name: b.d_out > b.d_in for b in blocks}
        self._flipped = {b.weight_name for b in blocks if (b.d_out > b.d_in) != (b.kind == "conv1d")}
        # the stored shape of each name's per-example gradient -> the names kept together, and each name's place
        self._groups: dict[tuple, list[str]] = {}
        for b in blocks:
            w = (b.d_in, b.d_out) if self._in_out[b.weight_name] else (b.d_out, b.d_in)
            self._groups.setdefault(w, []).append(b.weight_name)
            if b.bias_name is not None:
                self._groups.setdefault((b.d_out,), []).append(b.bias_name)
        self._slot = {n: (shape, i) for shape, names in self._groups.items() for i, n in enumerate(names)}
        self._pass = 0  # forwards of the model so far: the rows of one pass are one set of examples
        self._grads: dict[int, dict[tuple, Tensor]] = {}  # pass -> stored shape -> (names, rows, *shape)
        self._views: dict[tuple, tuple] = {}  # (pass, stored shape) -> that tensor's per-name views, places written
        # CPU: the last step's pass tensors, by (stored shape, rows, dtype), for the next step to write into (a fresh
        # tensor's pages fault on first write; CUDA's caching allocator recycles freed blocks itself)
        self._spare: dict[tuple, Tensor] = {}
        self._targets: Optional[tuple] = None  # (safety gradient, names, dtype) -> its stacked form (_stacked)
        self.mismatch = False  # the last apply() found the captured examples not adding up to the gradient
        self._cosines = torch.zeros(0)  # the last apply()'s c_i of this rank's examples, where they were computed
        self._ref = ref = weakref.ref(self)  # the hooks must not keep a discarded optimizer's screen alive
        self._handles = [model.register_forward_pre_hook(lambda *_: _call(ref, "_count"))]
        self._handles += [b.module.register_forward_hook(_capture_hook(ref, b)) for b in blocks]

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles, self._grads, self._views, self._spare = [], {}, {}, {}

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

    def _buffer(self, key: int, name: str, rows: int, dtype: torch.dtype, device: torch.device
                ) -> tuple[Tensor, bool]:
        """The pass's per-example gradients of ``name``, and whether this is their first write (the pass's tensors
        are allocated uninitialised at its first capture, which decides their dtype; :meth:`apply` zeroes the
        places no capture wrote)."""
        shape, i = self._slot[name]
        entries = self._grads.setdefault(key, {})
        if shape not in entries:
            spare = self._spare.pop((shape, rows, dtype), None) if device.type == "cpu" else None
            entries[shape] = spare if spare is not None else torch.empty(len(self._groups[shape]), rows, *shape,
                                                                         dtype=dtype, device=device)
            self._views[(key, shape)] = (entries[shape].unbind(0), set())
        views, written = self._views[(key, shape)]
        first = i not in written
        written.add(i)
        return views[i], first

    def _add(self, block: LinearBlock, key: int, x: Tensor, grad: Tensor) -> None:
        rows = x.shape[0]  # a block called twice in one forward: its examples' gradients are the sums
        dtype = torch.promote_types(torch.promote_types(x.dtype, grad.dtype), torch.float32)
        out, first = self._buffer(key, block.weight_name, rows, dtype, x.device)
        add_example_gradients(out, x, grad, transposed=self._in_out[block.weight_name], first=first)
        if block.bias_name is not None:
            out, first = self._buffer(key, block.bias_name, rows, dtype, x.device)
            bias = grad.to(out.dtype).reshape(rows, -1, block.d_out).sum(1)
            if first:
                out.copy_(bias)
            else:
                out.add_(bias)

    def clear(self) -> None:
        """Forget the captured examples (the gradients were discarded: ``zero_grad``)."""
        self._grads, self._views = {}, {}

    @property
    def cosines(self) -> Tensor:
        """The last :meth:`apply`'s ``c_i`` of this rank's examples, on the host (to choose a threshold); kept on the
        device until read, so that a step does not wait for them."""
        return self._cosines.cpu()

    @property
    def pending(self) -> int:
        """Examples captured since the last :meth:`apply` or :meth:`clear`."""
        return sum(next(iter(e.values())).shape[1] for e in self._grads.values() if e)

    def _stored(self, name: str, tensor: Tensor) -> Tensor:
        """``tensor`` in ``name``'s parameter layout as the screen keeps that name's per-example gradients, or back
        (the same transpose)."""
        return tensor.T if name in self._flipped else tensor

    def _stacked(self, safety_grad: dict[str, Tensor], names: list[str], dtype: torch.dtype
                 ) -> tuple[dict[tuple, tuple[list[str], Optional[Tensor], Tensor]], Tensor]:
        """Per stored shape: the screened names there, their places in the pass tensors (None: all of them) and
        their safety gradients stacked flat ``(names, numel)``; and the safety gradient's norm. Kept until the
        safety gradient is replaced (each refresh assigns a new dict)."""
        if self._targets is not None and self._targets[0] is safety_grad and self._targets[1:3] == (names, dtype):
            return self._targets[3]
        chosen = set(names)
        stacked = {}
        for shape, group in self._groups.items():
            kept = [n for n in group if n in chosen]
            if kept:
                places = (None if len(kept) == len(group) else
                          torch.tensor([self._slot[n][1] for n in kept], device=safety_grad[kept[0]].device))
                stacked[shape] = (kept, places, torch.stack([self._stored(n, safety_grad[n].to(dtype)).reshape(-1)
                                                             for n in kept]))
        norm = torch.stack([t.square().sum() for *_, t in stacked.values()]).sum().sqrt()
        self._targets = (safety_grad, names, dtype, (stacked, norm))
        return stacked, norm

    def apply(self, params: dict[str, Tensor], safety_grad: dict[str, Tensor]) -> tuple[int, int]:
        """Screen the examples captured since the last call against ``safety_grad`` (by parameter name) and remove
        their gradients from ``params``' ``.grad`` (module docstring); returns ``(screened, examples)`` over all
        ranks. Every rank must call it (DDP, FSDP2). It waits for the device once: the screened rows are summed by
        a product with their 0/1 weights, not selected, and the counts and the checks' sums are read together.

        When the captured examples do not add up to the gradient (its direction differs from ``sum_i G_i``: a step
        a GradScaler skipped left its examples behind while the model's ``zero_grad`` cleared the gradient, or
        gradients changed per parameter, as by ``clip_grad_value_``), nothing is screened this step and
        ``mismatch`` is set."""
        sharded = any(is_sharded(p) for p in params.values())  # FSDP2: the gradients are the ranks' shards
        passes, views, self._grads, self._views = self._grads, self._views, {}, {}
        self.mismatch = False
        names = [n for n in params if n in safety_grad]
        if not names:
            return 0, 0
        device = next(iter(params.values())).device
        dtype = torch.promote_types(next(iter(params.values())).dtype, torch.float32)
        targets, target_norm = self._stacked(safety_grad, names, dtype)  # g, as the examples are kept
        full = {s: torch.zeros_like(t) for s, (*_, t) in targets.items()}  # sum_i G_i, per stored shape
        dropped = {s: torch.zeros_like(t) for s, t in full.items()}  # the screened rows' sum
        counts = torch.zeros(2, dtype=torch.float64, device=device)  # screened, examples
        cosines = []
        while passes:  # each pass's per-example gradients are freed once screened
            key = next(iter(passes))
            entries = passes.pop(key)
            rows = next(iter(entries.values())).shape[1]
            flats = {}
            for shape, (_, places, _) in targets.items():
                if shape in entries:
                    _zero_unwritten(*views[(key, shape)])
                    f = entries[shape].reshape(entries[shape].shape[0], rows, -1)
                    flats[shape] = (f if places is None else f[places]).to(dtype)
            dots = torch.zeros(rows, dtype=dtype, device=device)
            squares = torch.zeros_like(dots)
            for shape, f in flats.items():
                dots += torch.bmm(f, targets[shape][2].unsqueeze(2)).sum((0, 2))
                squares += f.square().sum((0, 2))
            cos = -dots / (squares.sqrt() * target_norm).clamp_min(torch.finfo(dtype).tiny)
            drop = (cos > self.threshold) & (squares > 0)
            cosines.append(cos.detach())
            counts += torch.stack([drop.sum(), torch.tensor(rows, device=device)]).to(torch.float64)
            weights = torch.stack([torch.ones_like(dots), drop.to(dtype)])  # (2, rows): every row, the screened
            for shape, f in flats.items():
                both = torch.matmul(weights, f)  # (names, 2, numel): one read of f for both sums
                full[shape] += both[:, 0]
                dropped[shape] += both[:, 1]
            del flats
            for shape, t in entries.items():
                if t.device.type == "cpu":
                    self._spare[(shape, rows, t.dtype)] = t
            del entries
        self._cosines = torch.cat(cosines) if cosines else torch.zeros(0)
        all_reduce_sum_([counts, *full.values(), *dropped.values()])
        held = [n for n in names if params[n].grad is not None]
        if not held:
            return 0, int(counts[1])
        grads = [params[n].grad for n in held]
        if sharded:  # the whole gradients (one all-gather), as every rank holds them under DDP
            grads = gather_whole([params[n] for n in held], [g.to_local() for g in grads])
        grads = dict(zip(held, grads))
        sums = [counts[0], counts[1]]  # screened, examples; then <gradient, sum_i G_i>, |gradient|^2, |sum_i G_i|^2
        for shape, (kept, _, _) in targets.items():  # the gradient against the examples' sum, names with a .grad
            present = [i for i, n in enumerate(kept) if n in grads]
            if not present:
                continue
            g = torch.stack([self._stored(kept[i], grads[kept[i]]).reshape(-1).to(dtype) for i in present])
            part = full[shape] if len(present) == len(kept) else full[shape][present]
            sums += [(g * part).sum(), g.square().sum(), part.square().sum()]
        values = torch.stack([v.to(torch.float64) for v in sums]).tolist()  # the step's one wait for the device
        screened, examples = int(values[0]), int(values[1])
        inner, grad_sq, parts_sq = (sum(values[i::3]) for i in (2, 3, 4))
        norms = (grad_sq ** 0.5, parts_sq ** 0.5)
        if examples == 0 or norms[1] == 0.0:
            return 0, examples
        if inner < _ADDS_UP * norms[0] * norms[1]:
            self.mismatch = True
            return 0, examples
        if screened:
            scale = norms[0] / norms[1]
            with torch.no_grad():
                for n, g in grads.items():  # the screened rows' share, whole, in the parameter's layout
                    shape, _ = self._slot[n]
                    row = targets[shape][0].index(n)
                    removed = self._stored(n, scale * dropped[shape][row].view(self._stored(n, g).shape))
                    gr = params[n].grad
                    if sharded:  # each rank takes its part off its shard
                        gr.to_local().sub_(local_part(params[n], removed).to(gr.dtype))
                    else:
                        gr.sub_(removed.to(gr.dtype))
        return screened, examples


def _zero_unwritten(views: tuple[Tensor, ...], written: set[int]) -> None:
    """Zero the places of a pass's tensor that no capture wrote (a block the pass did not call)."""
    for i, view in enumerate(views):
        if i not in written:
            view.zero_()


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

