"""Find the linear blocks of a Hugging Face model and record what K-FAC needs from them.

A *block* is one weight matrix seen as a linear map ``y = W x (+ b)``: ``nn.Linear`` (weight (d_out, d_in)),
GPT-2's ``Conv1D`` (weight stored transposed, (d_in, d_out)) and the ``lora_A`` / ``lora_B`` linear modules of a
PEFT LoRA layer, which are separate blocks with their own factors: their inputs and the gradients reaching their
outputs, so the LoRA scaling (applied after ``lora_B``) sits in G. A DoRA adapter's (PEFT ``use_dora=True``) too:
PEFT computes its weight norm by calling ``lora_A`` on an identity matrix and ``lora_B`` on the result, and uses
that only detached (DoRA's paper, section 4.3), so no gradient reaches those calls; the capture skips them, and
the blocks' factors hold the data path, the one the gradients of ``lora_A`` and ``lora_B`` come from (the
magnitude vector is no linear block; the output gradient carries its scale ``m / |W + BA|``).

:class:`LayerCapture` hooks the blocks and hands each forward's inputs and each backward's output gradients,
restricted to the non-padding tokens, to callbacks. It refuses the silent errors that make hook-based curvature
wrong: a module called more than once per forward (weight reuse), a module that never ran or never received a
gradient (fused path, merged adapter), weights shared with another module (tying), and non-finite gradients.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

ModuleSelection = Union[None, str, Sequence[str]]


class CaptureError(RuntimeError):
    """A model, module selection or forward pass that hook-based curvature cannot handle correctly."""


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:  # transformers is optional for plain torch models
        return None


_CONV1D = _conv1d_type()


def _is_lora_module(name: str) -> bool:
    parts = name.split(".")
    return "lora_A" in parts or "lora_B" in parts


@dataclass
class LinearBlock:
    """One captured weight matrix. ``name`` is the module's name; parameter names are full dotted names."""

    name: str
    module: nn.Module
    kind: str  # "linear" or "conv1d"
    weight_name: str
    bias_name: Optional[str]
    d_in: int
    d_out: int
    dora: Optional[str] = None  # "A" / "B": the lora_A / lora_B of a DoRA adapter (its weight-norm calls skipped)

    def as_matrix(self, w: Tensor) -> Tensor:
        """A weight-shaped tensor as (d_out, d_in)."""
        return w.T if self.kind == "conv1d" else w

    def from_matrix(self, m: Tensor) -> Tensor:
        """A (d_out, d_in) matrix in the weight's own layout."""
        return m.T if self.kind == "conv1d" else m

    @property
    def param_names(self) -> list[str]:
        return [self.weight_name] + ([self.bias_name] if self.bias_name else [])


def block_of(name: str, module: nn.Module) -> Optional[LinearBlock]:
    """The :class:`LinearBlock` of ``module`` (named ``name``) when it is an ``nn.Linear``, GPT-2 ``Conv1D`` or LoRA
    layer, else None."""
    prefix = f"{name}." if name else ""
    bias = getattr(module, "bias", None)
    bias_name = f"{prefix}bias" if isinstance(bias, nn.Parameter) and bias.requires_grad else None
    if isinstance(module, nn.Linear):
        return LinearBlock(name, module, "linear", f"{prefix}weight", bias_name, module.in_features,
                           module.out_features)
    if _CONV1D is not None and isinstance(module, _CONV1D):
        d_in, d_out = module.weight.shape
        return LinearBlock(name, module, "conv1d", f"{prefix}weight", bias_name, d_in, d_out)
    return None


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` equals, or matches as a glob (``fnmatch``, case-sensitive), any of ``patterns``."""
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def find_blocks(model: nn.Module, modules: ModuleSelection = None) -> list[LinearBlock]:
    """Select the linear blocks to capture.

    Args:
        modules: ``None`` selects every LoRA ``lora_A``/``lora_B`` module when the model has any, else every
            ``nn.Linear``/``Conv1D`` except the output embedding (``lm_head``); ``"lora"`` selects the LoRA modules
            (an error if there are none); a list of module names or glob patterns (``fnmatch``, e.g.
            ``"*.mlp.*"``) selects what matches.

    Raises:
        CaptureError: nothing capturable is selected, a pattern matches nothing, or a selected weight is shared
            with another module (weight tying: hooks would see only one of its uses).
    """
    candidates = [(n, b) for n, m in model.named_modules() if (b := block_of(n, m)) is not None]
    if modules is None:
        lora = [b for n, b in candidates if _is_lora_module(n)]
        chosen = lora or [b for n, b in candidates if n.split(".")[-1] != "lm_head" and not _is_lora_module(n)]
    elif modules == "lora":
        chosen = [b for n, b in candidates if _is_lora_module(n)]
        if not chosen:
            raise CaptureError("modules='lora' but the model has no LoRA lora_A/lora_B modules")
    else:
        patterns = [modules] if isinstance(modules, str) else list(modules)
        chosen = [b for n, b in candidates if matches(n, patterns)]
        unmatched = [p for p in patterns if not any(matches(b.name, [p]) for b in chosen)]
        if unmatched:
            raise CaptureError(f"module pattern(s) {unmatched} match no nn.Linear/Conv1D/LoRA module")
    if not chosen:
        raise CaptureError(f"no capturable module (nn.Linear, Conv1D, LoRA) in {type(model).__name__} "
                           f"for selection {modules!r}")
    _refuse_tied(model, chosen)
    _mark_dora(model, chosen)
    return chosen


def _mark_dora(model: nn.Module, blocks: Iterable[LinearBlock]) -> None:
    """Set ``dora`` on the ``lora_A`` / ``lora_B`` blocks of adapters whose LoRA layer has a DoRA magnitude vector
    (PEFT's ``lora_magnitude_vector[adapter]``)."""
    for block in blocks:
        parts = block.name.split(".")
        side = next((i for i, p in enumerate(parts) if p in ("lora_A", "lora_B")), None)
        if side is None or side + 1 >= len(parts):
            continue
        layer = model.get_submodule(".".join(parts[:side]))
        magnitudes = getattr(layer, "lora_magnitude_vector", None)
        if isinstance(magnitudes, nn.ModuleDict) and parts[side + 1] in magnitudes:
            block.dora = parts[side][-1]


def _refuse_tied(model: nn.Module, blocks: Iterable[LinearBlock]) -> None:
    owners: dict[int, list[str]] = {}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mod_name}.{p_name}" if mod_name else p_name)
    for block in blocks:
        users = owners.get(id(block.module.weight), [])
        if len(users) > 1:
            others = sorted(set(users) - {block.weight_name})
            raise CaptureError(f"weight of module {block.name!r} is shared with {others} (weight tying); its hook "
                               "would see only one use. Exclude it from `modules`.")


ForwardFn = Callable[[LinearBlock, Tensor], None]
BackwardFn = Callable[[LinearBlock, Tensor], None]


class LayerCapture:
    """Context manager that hooks ``blocks`` and reports per-token inputs and output gradients.

    Before each forward call :meth:`expect_forward` with the (B, T) bool token mask (padding False). The forward
    callback receives the block and its inputs ``a`` (n_tokens, d_in); the backward callback the block and the
    gradient ``g`` (n_tokens, d_out) of the backpropagated scalar w.r.t. the block output, both restricted to the
    masked tokens in (batch, position) order and in the model's dtype. Blocks fed the same input tensor (e.g.
    ``q``/``k``/``v``) receive the same ``a`` object within a forward, so callbacks may share work by identity and
    must not modify it. After the forward call :meth:`check_forward`, after the backward :meth:`check_backward`.
    """

    def __init__(self, blocks: Sequence[LinearBlock], on_forward: Optional[ForwardFn] = None,
                 on_backward: Optional[BackwardFn] = None):
        self.blocks = list(blocks)
        self.on_forward = on_forward
        self.on_backward = on_backward
        self._handles: list = []
        self._mask: Optional[Tensor] = None
        self._rows: Optional[Tensor] = None  # indices of the masked tokens, None when every token counts
        self._selected: dict[int, tuple[Tensor, Tensor]] = {}  # id(input) -> (input, its selected rows)
        self._calls: dict[str, int] = {}
        self._grads: dict[str, int] = {}
        self._grad_sums: list[tuple[str, Tensor]] = []  # (block, sum of its output gradient), checked per backward
        self._dora_probes: dict[int, Tensor] = {}  # id -> output of a DoRA lora_A's weight-norm call in this forward
        # a zero scalar added to every block output (set per forward by the caller): backpropagating to it alone
        # reaches every block's output gradient without the weight-gradient products
        self.probe: Optional[Tensor] = None

    def __enter__(self) -> "LayerCapture":
        for block in self.blocks:
            self._handles.append(block.module.register_forward_hook(self._make_hook(block)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def expect_forward(self, token_mask: Tensor, tokens: Optional[int] = None) -> None:
        """Before a forward: its (B, T) token mask, and how many tokens it counts when the caller knows (then the
        selection is found without waiting for the device)."""
        self._mask = token_mask.reshape(-1).bool()
        if tokens is None:
            tokens = int(self._mask.sum())
        # the counted tokens' indices in order: a stable sort puts them first (a size known on the host, unlike
        # nonzero's)
        self._rows = None if tokens == self._mask.numel() else torch.argsort(
            (~self._mask).to(torch.uint8), stable=True)[:tokens]
        self._selected, self._dora_probes = {}, {}
        self._calls = {b.name: 0 for b in self.blocks}
        self._grads = {b.name: 0 for b in self.blocks}
        self._grad_sums = []

    def _select(self, t: Tensor, block: LinearBlock) -> Tensor:
        flat = t.reshape(-1, t.shape[-1])
        if flat.shape[0] != self._mask.shape[0]:
            raise CaptureError(f"module {block.name!r} saw {flat.shape[0]} rows but the batch has "
                               f"{self._mask.shape[0]} tokens (packed or reshaped inputs are not supported)")
        return flat if self._rows is None else flat.index_select(0, self._rows)

    def _select_input(self, t: Tensor, block: LinearBlock) -> Tensor:
        """The selected (detached) rows of a block input; blocks fed the same tensor (q/k/v) get the same tensor
        object, so consumers may share work by identity within one forward."""
        cached = self._selected.get(id(t))
        if cached is None or cached[0] is not t:
            cached = self._selected[id(t)] = (t, self._select(t.detach(), block))
        return cached[1]

    def _make_hook(self, block: LinearBlock):
        def hook(module, inputs, output):
            if self._mask is None or (block.dora is not None and self._dora_probe(block, inputs[0], output)):
                return
            self._calls[block.name] += 1
            if self._calls[block.name] > 1:
                raise CaptureError(f"module {block.name!r} ran twice in one forward pass (weight reuse/tying); "
                                   "K-FAC would mix its uses. Exclude it from `modules`.")
            if self.on_forward is not None:
                self.on_forward(block, self._select_input(inputs[0], block))
            if self.on_backward is not None and isinstance(output, Tensor) and output.requires_grad:
                if self.probe is not None:  # + 0: the same values and gradient, on a path that leads to the probe
                    output = output + self.probe.to(output.dtype)
                output.register_hook(lambda grad: self._on_grad(block, grad))
                return output
            return None

        return hook

    def _dora_probe(self, block: LinearBlock, x: Tensor, output) -> bool:
        """Whether this call of a DoRA block is PEFT's weight-norm computation (module docstring): ``lora_A`` on a
        square ``(d_in, d_in)`` input (the identity; data reach it as ``(batch, tokens, d_in)``), ``lora_B`` on that
        call's output."""
        if block.dora == "B":
            return id(x) in self._dora_probes and self._dora_probes[id(x)] is x
        if x.dim() == 2 and x.shape[0] == x.shape[1] == block.d_in:
            self._dora_probes[id(output)] = output
            return True
        return False

    def _on_grad(self, block: LinearBlock, grad: Tensor) -> None:
        self._grads[block.name] += 1
        g = self._select(grad.detach(), block)
        # a sum is non-finite iff an entry is (or the sum overflows float32): ~10x cheaper than isfinite().all();
        # checked once per backward (check_backward), so the hooks never wait for the device
        self._grad_sums.append((block.name, g.sum(dtype=torch.promote_types(g.dtype, torch.float32))))
        self.on_backward(block, g)

    def check_forward(self) -> None:
        silent = [n for n, c in self._calls.items() if c == 0]
        if silent:
            raise CaptureError(f"module(s) {silent} never ran in the forward pass (fused path, merged or "
                               "disabled adapter, or unused module); their curvature would be silently missing")

    def check_backward(self) -> None:
        """Refuse a backward that missed a block, or that gave a block a non-finite output gradient (named: the
        first in backward order; its callback has seen it, so what the callbacks accumulated is not to be used)."""
        missing = [n for n, c in self._grads.items() if c == 0]
        if missing:
            raise CaptureError(f"no gradient reached the output of module(s) {missing} (detached, frozen input "
                               "path or fused kernel)")
        sums, self._grad_sums = self._grad_sums, []
        if sums:
            finite = torch.stack([torch.isfinite(s) for _, s in sums])
            if not bool(finite.all()):  # the one wait for the device per backward
                raise FloatingPointError(f"non-finite gradient at the output of module "
                                         f"{sums[int((~finite).nonzero()[0])][0]!r}")
        self._mask, self._selected, self.probe, self._dora_probes = None, {}, None, {}
