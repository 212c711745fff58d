"""The per-token losses that every curvature object differentiates, and how to call the model.

Batches are Hugging Face dicts: ``input_ids`` (B, T), optional ``attention_mask`` (B, T) with 0 = padding, and
``labels`` (B, T) with -100 = ignored. Without ``labels`` the input ids are used with padding ignored (what HF's
language-modelling collator does).

:class:`CausalLMLoss` is HF's causal-LM loss: the logits at position t predict ``labels[t + 1]``. It is computed
here rather than taken from ``outputs.loss`` because HF casts logits to float32, which would spoil float64
curvature checks; the value is the same. The loss of a batch is the mean over its counted tokens (HF's
``outputs.loss``); a batch's *sum loss* is the sum of its per-token losses.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


def prepare_batch(batch: Mapping[str, Any], device: Optional[torch.device] = None) -> dict[str, Tensor]:
    """Validate an HF batch and return ``input_ids``, ``attention_mask`` and ``labels`` on ``device``."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError("a batch must be a mapping with at least 'input_ids' (and usually 'attention_mask', "
                         "'labels')")
    ids = torch.as_tensor(batch["input_ids"])
    if ids.dim() < 2 or ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, seq) tensor, got shape {tuple(ids.shape)}")
    mask = batch.get("attention_mask")
    mask = torch.ones(ids.shape[:2], dtype=torch.long, device=ids.device) if mask is None else torch.as_tensor(mask)
    labels = batch.get("labels")
    if labels is None:
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    else:
        labels = torch.as_tensor(labels)
    if mask.shape != ids.shape[:2] or labels.shape[:2] != ids.shape[:2]:
        raise ValueError(f"attention_mask {tuple(mask.shape)} and labels {tuple(labels.shape)} must match "
                         f"input_ids {tuple(ids.shape)}")
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def pad_right(t: Tensor, length: int, value) -> Tensor:
    """``t`` (rows, T, ...) padded with ``value`` on the right of its second dimension to ``length``."""
    extra = length - t.shape[1]
    if extra == 0:
        return t
    return torch.cat([t, t.new_full((t.shape[0], extra, *t.shape[2:]), value)], dim=1)


def concat_batches(batches: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Prepared batches (:func:`prepare_batch`) as one: rows stacked in order, each right-padded to the longest
    with input id 0, attention 0 and label -100 (0.0 for float labels): padding attended by no one and counted
    nowhere. In a causal model right padding changes no earlier position's output, so every row's losses are its
    own batch's (up to float rounding). One batch comes back as it is."""
    if len(batches) == 1:
        return dict(batches[0])
    length = max(b["input_ids"].shape[1] for b in batches)
    label_pad = 0.0 if batches[0]["labels"].is_floating_point() else IGNORE_INDEX
    return {key: torch.cat([pad_right(b[key], length, value) for b in batches])
            for key, value in (("input_ids", 0), ("attention_mask", 0), ("labels", label_pad))}


Item = TypeVar("Item")


def merged(items: Iterable[Item], shape: Callable[[Item], tuple[int, int]], max_tokens: Optional[int],
           max_rows: Optional[int] = None) -> Iterator[list[Item]]:
    """``items`` (batches, or anything with a ``(rows, length)`` ``shape``) in groups of consecutive ones, in order,
    each as large as it can be while the merged batch (:func:`concat_batches`: rows stacked, padded to the longest)
    stays within ``max_tokens`` tokens (rows x longest length) and ``max_rows`` rows; an item over the limits on its
    own is a group alone. Each item alone when ``max_tokens`` is None. Streams: a group is yielded before the
    items after it are drawn."""
    pending: list[Item] = []
    rows = length = 0
    for item in items:
        r, t = shape(item)
        if pending:
            rows, length = rows + r, max(length, t)
            if max_tokens is None or rows * length > max_tokens or (max_rows is not None and rows > max_rows):
                yield pending
                pending = []
        if not pending:
            rows, length = r, t
        pending.append(item)
    if pending:
        yield pending


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def model_inputs(model: nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The keyword arguments curvature passes call ``model`` with: ``input_ids``, ``attention_mask`` and, for HF
    models, ``use_cache=False`` (no key/value cache is built for a single forward)."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False
    return kwargs


def output_tensor(out) -> Tensor:
    """The output tensor of a model call: ``.logits`` when present."""
    return out.logits if hasattr(out, "logits") else out


def call_model(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Run the model on ``input_ids``/``attention_mask`` and return its output tensor (``.logits`` when present)."""
    return output_tensor(model(**model_inputs(model, batch)))


@contextmanager
def eval_flags(model: nn.Module) -> Iterator[None]:
    """Every module of ``model`` in eval mode (no dropout) for the duration, each given back its own flag after.

    The ``training`` flags are set directly, not through ``train()`` / ``eval()``: a model's overrides of those are
    not run. transformers' (with the Hugging Face ``kernels`` package installed, which its ``from_pretrained``
    then uses by default) re-kernelizes the model at every switch, to inference kernels in eval mode, which need not
    have a backward; here the model keeps the kernels it runs with. A model whose modules were in mixed modes (a
    frozen part in eval) gets each back as it was.
    """
    modules = list(model.modules())
    flags = [m.training for m in modules]
    # object.__setattr__: what nn.Module.__setattr__ ends in for a plain value, without its checks for parameters,
    # buffers and sub-modules (a third of the cost of a switch on a small model)
    for m in modules:
        object.__setattr__(m, "training", False)
    try:
        yield
    finally:
        for m, flag in zip(modules, flags):
            object.__setattr__(m, "training", flag)


@contextmanager
def curvature_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout; :func:`eval_flags`) and the math SDPA backend for the duration of a curvature
    computation.

    PyTorch's fused SDPA kernels on CPU (and flash/efficient attention on GPU) have no second derivatives and no
    forward-mode AD; the math backend computes the same attention with differentiable ops. The user's model is
    left as it was (every module's training flag restored, nothing reloaded).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with eval_flags(model), sdpa_kernel([SDPBackend.MATH]):
        yield


def counted_token_losses(loss, output: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """(B, T) per-token losses of ``loss`` with every position outside ``valid`` (ignored target, padding) zero:
    the one masked loss that sums, means and per-sequence sums are taken of."""
    return loss.token_losses(output, targets).masked_fill(~valid, 0)


class CausalLMLoss:
    """Next-token cross-entropy, HF conventions (shift by one, -100 ignored), in the logits' dtype (>= fp32)."""

    def targets(self, batch: Mapping[str, Tensor]) -> Tensor:
        """(B, T) target of each output position; the last position and ignored labels get -100."""
        labels = batch["labels"]
        shifted = torch.full_like(labels, IGNORE_INDEX)
        shifted[:, :-1] = labels[:, 1:]
        return shifted

    @staticmethod
    def valid(targets: Tensor) -> Tensor:
        return targets != IGNORE_INDEX

    @staticmethod
    def _upcast(logits: Tensor) -> Tensor:
        return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits

    def token_losses(self, logits: Tensor, targets: Tensor) -> Tensor:
        """(B, T) per-token losses, 0 where the target is ignored."""
        z = self._upcast(logits)
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction="none").view(targets.shape)

    def sample_targets(self, logits: Tensor, targets: Tensor, generator: torch.Generator) -> Tensor:
        """Targets drawn from the model's predictive distribution at the counted positions (MC Fisher)."""
        probs = torch.softmax(self._upcast(logits.detach()), dim=-1).reshape(-1, logits.shape[-1])
        draws = torch.multinomial(probs, 1, generator=generator).view(targets.shape)
        return torch.where(self.valid(targets), draws, targets)

    def output_hessian_vp(self, logits: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        """Hessian of the sum loss w.r.t. the logits applied to ``u`` (B, T, V): ``p*u - p*(p.u)`` per token."""
        p = torch.softmax(self._upcast(logits.detach()), dim=-1)
        hu = p * u - p * (p * u).sum(-1, keepdim=True)
        return hu * self.valid(targets).unsqueeze(-1).to(hu.dtype)

    def output_hessian_sqrt(self, logits: Tensor) -> Tensor:
        """(n, V, V) ``S`` with ``S S^T`` = the CE Hessian ``diag(p) - p p^T`` of each of the n rows of logits."""
        p = torch.softmax(self._upcast(logits.detach()), dim=-1)
        sp = p.sqrt()
        return torch.diag_embed(sp) - p.unsqueeze(-1) * sp.unsqueeze(-2)


class MSELoss:
    """``0.5 * ||output - labels||^2`` per token, for regression models (float ``labels`` shaped like the output)
    whose padding is given by ``attention_mask``. Used to check K-FAC against exact GGNs on deep linear networks."""

    def targets(self, batch: Mapping[str, Tensor]) -> Tensor:
        return batch["labels"].masked_fill(~batch["attention_mask"].bool().unsqueeze(-1), float("nan"))

    @staticmethod
    def valid(targets: Tensor) -> Tensor:
        return ~torch.isnan(targets).any(-1)

    def token_losses(self, output: Tensor, targets: Tensor) -> Tensor:
        diff = torch.nan_to_num(output - targets) * self.valid(targets).unsqueeze(-1)
        return 0.5 * diff.square().sum(-1)

    def sample_targets(self, output: Tensor, targets: Tensor, generator: torch.Generator) -> Tensor:
        noise = torch.randn(output.shape, generator=generator, dtype=output.dtype, device=output.device)
        return torch.where(self.valid(targets).unsqueeze(-1), output.detach() + noise, targets)

    def output_hessian_vp(self, output: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        return u * self.valid(targets).unsqueeze(-1).to(u.dtype)

    def output_hessian_sqrt(self, output: Tensor) -> Tensor:
        n, c = output.shape
        return torch.eye(c, dtype=output.dtype, device=output.device).expand(n, c, c)
