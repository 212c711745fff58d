"""One hooked pass over batches: forward, (sampled) targets, backward, with the layer callbacks in between.

Shared by K-FAC, the EK-FAC eigenvalue correction and the exact Fisher diagonal, so that masking, the Fisher
type, the sdpa switch and the silent-error checks live in one place.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ..capture import CaptureError, LayerCapture, LinearBlock
from ..config import FisherType, parse_option
from .loss import call_model, counted_token_losses, curvature_mode, model_device, prepare_batch
from .sequence_grads import Segments
from .vectors import host_floats

VERIFY_TOKENS = 32  # tokens of the one sequence that the hooks' check runs on (capture_pass(verify=True))


@dataclass
class BatchInfo:
    """What the callbacks may read about the batch in flight."""

    segments: Segments = field(default_factory=Segments.empty)  # the counted tokens' rows
    num_sequences: int = 0
    num_tokens: int = 0
    # counted positions (targets not ignored, not padding): a 0-d tensor on the batch's device, so that no batch
    # waits for the device to count them (a callback that divides by it keeps the division there)
    num_loss_tokens: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))


@dataclass
class PassTotals:
    batches: int = 0
    sequences: int = 0
    tokens: int = 0
    loss_tokens: int = 0  # set by read() at the pass's end
    loss_sum: float = 0.0  # of the backpropagated per-token losses (empirical: the data's NLL; type2: not kept)
    _on_device: Optional[Tensor] = None  # [loss tokens, loss sum] while the pass runs (float64)

    def add(self, info: BatchInfo, loss_sum: Optional[Tensor] = None) -> None:
        """Count a finished batch (its loss sum, when kept, on the device until :meth:`read`)."""
        self.batches += 1
        self.sequences += info.num_sequences
        self.tokens += info.num_tokens
        pair = torch.stack([info.num_loss_tokens.double(),
                            torch.zeros((), dtype=torch.float64, device=info.num_loss_tokens.device)
                            if loss_sum is None else loss_sum.detach().double()])
        self._on_device = pair if self._on_device is None else self._on_device + pair

    def read(self) -> None:
        """``loss_tokens`` and ``loss_sum`` from the device: the pass's one read of them."""
        if self._on_device is not None:
            count, total = self._on_device.tolist()
            self.loss_tokens, self.loss_sum, self._on_device = int(count), total, None


def default_progress() -> bool:
    return sys.stderr.isatty()


def materialize(batches: Iterable) -> list:
    """Batches as a list (curvature objects pass over the data more than once); empty data is an error."""
    data = list(batches)
    if not data:
        raise ValueError("no batches given: curvature needs at least one batch")
    return data


@contextmanager
def requiring_grad(tensors: Iterable[Tensor]) -> Iterator[list[Tensor]]:
    """Temporarily make ``tensors`` require grad (so outputs carry gradients even when they are frozen); yields
    them as a list."""
    tensors = list(tensors)
    previous = [t.requires_grad for t in tensors]
    for t in tensors:
        t.requires_grad_(True)
    try:
        yield tensors
    finally:
        for t, flag in zip(tensors, previous):
            t.requires_grad_(flag)


def capture_pass(model: nn.Module, blocks: Sequence[LinearBlock], batches: Sequence, *, loss, fisher_type: str,
                 generator: Optional[torch.Generator], on_forward: Callable[[LinearBlock, Tensor], None],
                 on_backward: Callable[[LinearBlock, Tensor], None], info: BatchInfo,
                 on_batch_end: Optional[Callable[[], None]] = None, desc: str = "curvature",
                 progress: Optional[bool] = None, verify: bool = True,
                 on_weight_grads: Optional[Callable[[Sequence[Optional[Tensor]]], None]] = None) -> PassTotals:
    """Run every batch through the hooked model and backpropagate the sum of per-token losses.

    ``fisher_type``: ``"empirical"`` uses the batch labels; ``"mc"`` draws one target per counted position from
    the model's predictive distribution (``generator``); ``"type2"`` backpropagates every column of the output
    Hessian's square root at every counted position separately (exact GGN factors; positions x vocabulary
    backward passes, for tests and tiny models).
    ``on_weight_grads`` receives each batch's gradients of the backpropagated sum w.r.t. the blocks' weights
    (None for an unused weight; not called for ``"type2"``).
    With ``verify``, one small extra pass first checks the hooks (:class:`_HookCheck`): on the data's first
    sequence, cut to ``VERIFY_TOKENS`` tokens, each weight's autograd gradient must equal ``sum_t g_t a_t^T`` from
    the hooks; a mismatch means the weight is used outside its module's forward (a fused path) and is refused. Its
    cost does not grow with the batch: the check is of the model's structure, not of the data.
    Without ``on_weight_grads`` every batch backpropagates only to a zero scalar added to every block's output
    (:attr:`LayerCapture.probe`), so autograd skips the weight-gradient products (a third of a linear layer's
    backward work) and keeps no block output alive.
    """
    from tqdm.auto import tqdm

    fisher_type = parse_option(FisherType, fisher_type, "fisher_type").value
    device = model_device(model)
    totals = PassTotals()
    check = _HookCheck()

    used: dict[str, Tensor] = {}  # each block's weight as its forward used it (FSDP2: the whole parameter)

    def forward_cb(block: LinearBlock, a: Tensor) -> None:
        used[block.name] = block.module.weight
        (check.forward if check.active else on_forward)(block, a)

    def backward_cb(block: LinearBlock, g: Tensor) -> None:
        (check.backward if check.active else on_backward)(block, g)

    show = default_progress() if progress is None else progress
    with curvature_mode(model), requiring_grad(b.module.weight for b in blocks) as own_weights, \
            LayerCapture(blocks, forward_cb, backward_cb) as capture:

        def used_weights() -> list[Tensor]:
            return [used.get(b.name, w) for b, w in zip(blocks, own_weights)]

        if verify and batches:
            check.run(model, capture, _first_tokens(batches, device, VERIFY_TOKENS), used_weights)
        for raw in tqdm(batches, desc=desc, disable=not show, leave=False):
            batch = prepare_batch(raw, device)
            token_mask = _describe_tokens(batch, info)
            capture.expect_forward(token_mask, info.num_tokens)
            weight_grads = fisher_type != "type2" and on_weight_grads is not None
            if fisher_type != "type2" and not weight_grads:
                capture.probe = torch.zeros((), device=device, requires_grad=True)
            output = call_model(model, batch)
            capture.check_forward()
            weights = used_weights()
            targets = loss.targets(batch)
            if fisher_type == "mc":
                targets = loss.sample_targets(output, targets, generator)
            valid = loss.valid(targets) & token_mask
            info.num_loss_tokens = valid.sum()
            total = None
            if fisher_type == "type2":
                _backward_hessian_sqrt_columns(output, valid, loss, weights)
            else:
                total = counted_token_losses(loss, output, targets, valid).sum()
                if weight_grads:
                    on_weight_grads(torch.autograd.grad(total, weights, allow_unused=True))
                else:  # the hooks need the blocks' output gradients only: no weight-gradient GEMMs
                    torch.autograd.grad(total, capture.probe, allow_unused=True)
            capture.check_backward()
            totals.add(info, total)
            if on_batch_end is not None:
                on_batch_end()
    totals.read()
    if totals.loss_tokens == 0:
        raise ValueError("every token is ignored (labels all -100 or all padding): there is no loss to curve")
    return totals


def _describe_tokens(batch: dict, info: BatchInfo) -> Tensor:
    """The batch's non-padding token mask; ``info`` gets its tokens' grouping by row and the batch's counts (one
    read of the rows' lengths from the device: the blocks' callbacks then need none)."""
    token_mask = batch["attention_mask"].bool()
    info.segments = Segments.from_lengths(token_mask.sum(dim=1))
    info.num_sequences = info.segments.sequences
    info.num_tokens = info.segments.tokens
    return token_mask


class _HookCheck:
    """The hooks' check of ``capture_pass(verify=True)``: one hooked forward of a few tokens (:meth:`run`), the
    gradient of a fixed random projection of its output backpropagated to the weights, and per block the hooks'
    ``sum_t g_t a_t^T`` compared with autograd's weight gradient (:func:`_verify_weight_grads`). While it runs
    (``active``) the hooks feed it, not the pass's callbacks."""

    def __init__(self):
        self.active = False
        self.stash: dict[str, Tensor] = {}
        self.hook_grads: dict[str, tuple[Tensor, float]] = {}  # block -> (sum_t g_t a_t^T, tolerance)

    def forward(self, block: LinearBlock, a: Tensor) -> None:
        self.stash[block.name] = a

    def backward(self, block: LinearBlock, g: Tensor) -> None:
        a = self.stash.pop(block.name)  # under autocast the input may be float32 and g bfloat16
        dtype = torch.promote_types(torch.promote_types(g.dtype, a.dtype), torch.float32)
        # rounding of a low-precision g or a bounds the mismatch: 1e-3, or 4 eps of the coarser dtype
        eps = max(torch.finfo(t.dtype).eps for t in (g, a))
        self.hook_grads[block.name] = (g.T.to(dtype) @ a.to(dtype), max(1e-3, 4 * eps))

    def run(self, model: nn.Module, capture: LayerCapture, part: dict[str, Tensor],
            used_weights: Callable[[], list[Tensor]]) -> None:
        """Check the hooks on the batch ``part`` (one short sequence, :func:`_first_tokens`)."""
        capture.expect_forward(part["attention_mask"].bool())
        self.active = True
        try:
            output = call_model(model, part)
            capture.check_forward()
            weights = used_weights()
            generator = torch.Generator(device=output.device).manual_seed(0)
            direction = torch.randn(output.shape, generator=generator, device=output.device)
            # padding's outputs are left out of the hooks' sums: no gradient may come from them
            direction *= part["attention_mask"].reshape(*output.shape[:2], *([1] * (output.dim() - 2)))
            grads = torch.autograd.grad((output.float() * direction).sum(), weights, allow_unused=True)
            capture.check_backward()
        finally:
            self.active = False
        _verify_weight_grads(capture.blocks, grads, self.hook_grads)


def _first_tokens(batches: Sequence, device: torch.device, n: int) -> dict[str, Tensor]:
    """The first row with a non-padding token in ``batches``, from its first to its last such token but at most
    ``n`` tokens (left or right padding alike), as a batch of one. When every token is padding, the first row's
    first ``n`` tokens: the check then compares zeros (and the pass refuses the data), yet every rank of a
    distributed pass runs the same forwards."""
    for raw in batches:
        batch = prepare_batch(raw, device)
        mask = batch["attention_mask"].bool()
        rows = mask.any(dim=1).nonzero()
        if rows.numel():
            row = int(rows[0])
            kept = mask[row].nonzero()
            start, stop = int(kept[0]), int(kept[-1]) + 1
            return {k: v[row:row + 1, start:min(stop, start + n)] for k, v in batch.items()}
    return {k: v[:1, :n] for k, v in prepare_batch(batches[0], device).items()}


def _backward_hessian_sqrt_columns(output: Tensor, valid: Tensor, loss, weights: Sequence[Tensor]) -> None:
    """Backpropagate every column of each counted position's output-Hessian square root separately, so the hooks
    accumulate ``sum_s J_s^T H_s J_s`` exactly (one column for several positions at once would add cross terms)."""
    positions = valid.nonzero().tolist()
    sqrt = loss.output_hessian_sqrt(output[valid])
    last = (len(positions) - 1, sqrt.shape[-1] - 1)
    for k, pos in enumerate(positions):
        for c in range(sqrt.shape[-1]):
            grad_out = torch.zeros_like(output)
            grad_out[tuple(pos)] = sqrt[k, :, c]
            torch.autograd.grad(output, weights, grad_outputs=grad_out, retain_graph=(k, c) != last,
                                allow_unused=True)


def _verify_weight_grads(blocks: Sequence[LinearBlock], grads: Sequence[Optional[Tensor]],
                         hook_grads: dict[str, tuple[Tensor, float]]) -> None:
    checked, values = [], []  # (block, tolerance); per block its relative mismatch and gradient norm
    for block, grad in zip(blocks, grads):
        if grad is None or block.name not in hook_grads:
            continue
        expected, tol = hook_grads[block.name]
        actual = block.as_matrix(grad).to(expected.dtype)
        norm = actual.norm()
        values += [(actual - expected).norm() / norm.clamp_min(torch.finfo(actual.dtype).tiny), norm]
        checked.append((block, tol))
    values = host_floats(values)  # read at once: one wait for the device, not two per block
    for (block, tol), err, norm in zip(checked, values[::2], values[1::2]):
        if err > tol and norm > 1e-12:
            raise CaptureError(f"module {block.name!r}: its weight gets gradient from outside its forward "
                               f"(relative mismatch {err:.2e}); a fused path or shared weight would make "
                               "hook-based curvature silently wrong. Exclude it from `modules`.")
