"""Exact curvature-vector products of the model's mean loss: Hessian, GGN and empirical Fisher.

Convention: the objective is ``L = (1/K) sum_k L_k`` over the K given batches, with ``L_k`` the batch's mean
per-token loss (HF's ``outputs.loss``; see :mod:`.loss`). For parameter vectors ``v`` (dicts ``{name: tensor}``):

- :func:`hvp` returns ``H v`` with ``H`` the Hessian of ``L`` (forward-over-reverse with ``torch.func``, falling
  back to double backward when a model's ops lack forward-mode AD);
- :func:`ggn_vp` returns ``J^T H_out J v`` averaged the same way (``H_out`` the Hessian of the loss w.r.t. the
  model output);
- :func:`empirical_fisher_vp` returns ``(1/K) sum_k (1/N_k) sum_{n in k} g_n <g_n, v>`` with ``g_n`` the gradient
  of sequence n's sum loss and ``N_k`` the counted tokens of batch k (exact, via one JVP and one VJP).

``params`` selects the parameters (default: those with ``requires_grad``) as a list of names or a dict. All three
run with the math SDPA backend in eval mode (the fused CPU SDPA kernel has no second derivatives), on a model
loaded with default settings. Under ``torch.distributed`` results are summed over ranks and divided by the total
number of batches.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._pass import materialize, requiring_grad
from .base import CurvatureOperator
from .distributed import all_reduce_counts, all_reduce_sum_
from .sharded import dual_parameters, forward_tensors, is_sharded
from .loss import (CausalLMLoss, call_model, counted_token_losses, curvature_mode, model_device, model_inputs,
                   output_tensor, prepare_batch)
from .vectors import ParamVector, check_vector

ParamSelection = Union[None, Sequence[str], Mapping[str, Tensor]]

_NO_FORWARD_AD: set[type] = set()


def select_params(model: nn.Module, params: ParamSelection = None) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` for ``params``: ``None`` for every ``requires_grad`` parameter; a dict (a vector over
    parameters) for its exact names; a list of names or glob patterns (``fnmatch``, as ``restore``'s ``params``
    and :func:`curvsafe.capture.find_blocks`), each matching at least one parameter, in the list's order (a
    pattern's matches in the model's order)."""
    from ..capture import matches

    named = dict(model.named_parameters())
    if params is None:
        chosen = {n: p for n, p in named.items() if p.requires_grad}
    elif isinstance(params, Mapping):
        unknown = [n for n in params if n not in named]
        if unknown:
            raise ValueError(f"unknown parameter name(s) {unknown[:5]}")
        chosen = {n: named[n] for n in params}
    else:
        chosen, unknown = {}, []
        for entry in [params] if isinstance(params, str) else params:
            hits = [entry] if entry in named else [n for n in named if matches(n, [entry])]
            unknown += [] if hits else [entry]
            chosen.update((n, named[n]) for n in hits)
        if unknown:
            raise ValueError(f"parameter name(s) or pattern(s) matching no parameter: {unknown[:5]}")
    if not chosen:
        raise ValueError("no parameters selected (none requires grad); pass `params`")
    return chosen


def _prepare(model: nn.Module, batches: Iterable, v: Mapping[str, Tensor], params: ParamSelection):
    data = materialize(batches)
    chosen = select_params(model, params)
    check_vector(v, {n: p.shape for n, p in chosen.items()})
    return data, chosen


def _batch_loss_terms(model: nn.Module, batch: Mapping[str, Tensor], loss) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Model output, targets, the (B, T) counted-position mask, and the number of counted tokens."""
    output = call_model(model, batch)
    targets = loss.targets(batch)
    valid = loss.valid(targets) & batch["attention_mask"].bool()
    count = valid.sum()
    if int(count) == 0:
        raise ValueError("a batch has every token ignored (labels all -100 or padding): its mean loss is undefined")
    return output, targets, valid, count


def _finish(results: list[ParamVector], names: Sequence[str], device: torch.device) -> ParamVector:
    total = {n: sum(r[n] for r in results) for n in names}
    all_reduce_sum_(total.values())
    (k,) = all_reduce_counts([float(len(results))], device)
    return {n: t / k for n, t in total.items()}


def _mean_loss_fn(model: nn.Module, batch: Mapping[str, Tensor], names: Sequence[str], loss) -> Callable:
    from torch.func import functional_call

    def f(*tensors: Tensor) -> Tensor:
        output = output_tensor(functional_call(model, dict(zip(names, tensors)), args=(),
                                               kwargs=model_inputs(model, batch)))
        targets = loss.targets(batch)
        valid = loss.valid(targets) & batch["attention_mask"].bool()
        return counted_token_losses(loss, output, targets, valid).sum() / valid.sum()

    return f


def _hvp_forward_over_reverse(model, batch, names, primals, tangents, loss) -> tuple[Tensor, ...]:
    from torch.func import grad, jvp

    f = _mean_loss_fn(model, batch, names, loss)
    _, hv = jvp(grad(f, argnums=tuple(range(len(names)))), primals, tangents)
    return hv


def _hvp_double_backward(model, batch, names, primals, tangents, loss) -> tuple[Tensor, ...]:
    output, targets, valid, count = _batch_loss_terms(model, batch, loss)
    value = counted_token_losses(loss, output, targets, valid).sum() / count
    grads = torch.autograd.grad(value, primals, create_graph=True)
    return torch.autograd.grad(grads, primals, grad_outputs=tangents, allow_unused=True)


def hvp(model: nn.Module, batches: Iterable, v: Mapping[str, Tensor], params: ParamSelection = None, *,
        loss=None, method: str = "auto", max_rows: Optional[int] = None) -> ParamVector:
    """Exact Hessian-vector product of the mean loss (module docstring). ``method``: ``"auto"`` (forward-over-
    reverse, double backward if the model lacks forward-mode AD), ``"forward"`` or ``"double_backward"``.
    ``max_rows``: run each batch in chunks of at most this many rows (same product, less activation memory)."""
    if method not in ("auto", "forward", "double_backward"):
        raise ValueError(f"method must be 'auto', 'forward' or 'double_backward', got {method!r}")

    def per_batch(model, batch, names, primals, tangents, loss):
        if method == "forward" or (method == "auto" and type(model) not in _NO_FORWARD_AD):
            try:
                return _hvp_forward_over_reverse(model, batch, names, tuple(p.detach() for p in primals), tangents,
                                                 loss)
            except (RuntimeError, NotImplementedError):
                if method == "forward":
                    raise
                _NO_FORWARD_AD.add(type(model))
        return _hvp_double_backward(model, batch, names, primals, tangents, loss)

    return _products(model, batches, v, params, loss, per_batch, max_rows)


def _output_jvp(output: Tensor, primals: Sequence[Tensor], tangents: Sequence[Tensor]) -> Tensor:
    """``J v`` of ``output`` w.r.t. ``primals`` by the double-VJP trick (no forward-mode AD needed)."""
    u = torch.zeros_like(output, requires_grad=True)
    vjp = torch.autograd.grad(output, primals, grad_outputs=u, create_graph=True, allow_unused=True)
    pairs = [(g, t) for g, t in zip(vjp, tangents) if g is not None]
    return torch.autograd.grad([g for g, _ in pairs], u, grad_outputs=[t for _, t in pairs], retain_graph=True)[0]


def _row_chunks(batch: Mapping[str, Tensor], loss, max_rows: Optional[int]) -> list[tuple[dict, Optional[float]]]:
    """``batch`` as chunks of at most ``max_rows`` rows, each with its share of the batch's counted tokens (the
    weight that turns a chunk's mean-loss product into its part of the batch's); chunks without a counted token
    are left out. ``[(batch, None)]`` when it needs no split."""
    rows = batch["input_ids"].shape[0]
    if max_rows is None or rows <= max_rows:
        return [(dict(batch), None)]
    per_row = (loss.valid(loss.targets(batch)) & batch["attention_mask"].bool()).sum(1)
    total = float(per_row.sum())
    chunks = []
    for i in range(0, rows, max_rows):
        counted = float(per_row[i:i + max_rows].sum())
        if counted > 0:
            chunks.append(({k: t[i:i + max_rows] for k, t in batch.items()}, counted / total))
    return chunks


class _ForwardTensors(Sequence):
    """The tensors the named parameters were in the last forward (FSDP2's whole parameters), read when used."""

    def __init__(self, used: Mapping[str, Tensor], names: Sequence[str]):
        self.used, self.names = used, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):
        return self.used[self.names[i]]


def _products(model: nn.Module, batches: Iterable, v: Mapping[str, Tensor], params: ParamSelection, loss,
              per_batch: Callable, max_rows: Optional[int] = None, *,
              sharded_per_batch: Optional[Callable] = None) -> ParamVector:
    """The mean over ``batches`` of ``per_batch(model, batch, names, primals, tangents, loss)`` (a tuple of
    products of the batch's mean loss w.r.t. ``primals``; None for an unused one), in curvature mode,
    all-reduced: the body of :func:`hvp`, :func:`ggn_vp` and :func:`empirical_fisher_vp`. With ``max_rows`` a
    batch runs in row chunks whose products are weighted by their share of its counted tokens (the same mean).
    On an FSDP2-sharded model ``sharded_per_batch`` runs instead (None: the product is refused, since FSDP2 frees
    each layer's whole weights after its backward and a double backward would read them), with ``primals`` the
    whole parameters each forward used (read after the forward)."""
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
    loss = loss or CausalLMLoss()
    data, chosen = _prepare(model, batches, v, params)
    names = list(chosen)
    device = model_device(model)
    sharded = any(is_sharded(p) for p in chosen.values())
    if sharded and sharded_per_batch is None:
        raise ValueError("this product needs a double backward through every layer, which an FSDP2-sharded model "
                         "does not keep; the GGN (ggn_vp) runs sharded")
    if sharded:
        per_batch = sharded_per_batch
    if sharded and max_rows is not None:
        raise ValueError("row chunks (max_rows / ggn_rows) do not run on an FSDP2-sharded model: ranks whose "
                         "batches have other row counts would run other numbers of forwards")
    results = []
    with curvature_mode(model), requiring_grad(chosen.values()), forward_tensors(model, chosen) as used:
        primals = _ForwardTensors(used, names) if sharded else tuple(chosen[n] for n in names)
        tangents = tuple(v[n].to(chosen[n].dtype) for n in names)
        for raw in data:
            total = None
            for chunk, weight in _row_chunks(prepare_batch(raw, device), loss, max_rows):
                out = per_batch(model, chunk, names, primals, tangents, loss)
                part = [(o if o is not None else torch.zeros_like(chosen[n])).detach() for n, o in zip(names, out)]
                if weight is not None:
                    part = [p * weight for p in part]
                total = part if total is None else [t + p for t, p in zip(total, part)]
            results.append(dict(zip(names, total)))
    return _finish(results, names, device)


def _ggn_batch(model, batch, names, primals, tangents, loss):
    output, targets, valid, count = _batch_loss_terms(model, batch, loss)
    jv = _output_jvp(output, primals, tangents)
    hjv = loss.output_hessian_vp(output, targets, jv) * valid.unsqueeze(-1) / count
    return torch.autograd.grad(output, primals, grad_outputs=hjv.to(output.dtype), allow_unused=True)


def _empirical_fisher_batch(model, batch, names, primals, tangents, loss):
    output, targets, valid, count = _batch_loss_terms(model, batch, loss)
    per_seq = counted_token_losses(loss, output, targets, valid).sum(dim=1)  # (B,)
    c = _output_jvp(per_seq, primals, tangents)  # c_n = <g_n, v>
    return torch.autograd.grad(per_seq, primals, grad_outputs=(c / count).detach(), allow_unused=True)


def _ggn_batch_forward_mode(model, batch, names, primals, tangents, loss):
    """``_ggn_batch`` with ``J v`` in forward mode (dual parameters) instead of a double backward: one forward and
    one ordinary backward, which FSDP2 runs (it frees each layer's whole weights after its backward, so a second
    backward through them would read freed storage)."""
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), dual_parameters(model, dict(zip(names, tangents))):
        output, targets, valid, count = _batch_loss_terms(model, batch, loss)
        output, jv = fwAD.unpack_dual(output)
    jv = torch.zeros_like(output) if jv is None else jv
    hjv = loss.output_hessian_vp(output, targets, jv) * valid.unsqueeze(-1) / count
    return torch.autograd.grad(output, tuple(primals), grad_outputs=hjv.to(output.dtype), allow_unused=True)


def ggn_vp(model: nn.Module, batches: Iterable, v: Mapping[str, Tensor], params: ParamSelection = None, *,
           loss=None, max_rows: Optional[int] = None) -> ParamVector:
    """Generalised Gauss-Newton-vector product ``J^T H_out J v`` of the mean loss (module docstring);
    ``max_rows`` as in :func:`hvp`. On an FSDP2-sharded model ``J v`` is taken in forward mode."""
    return _products(model, batches, v, params, loss, _ggn_batch, max_rows, sharded_per_batch=_ggn_batch_forward_mode)


def empirical_fisher_vp(model: nn.Module, batches: Iterable, v: Mapping[str, Tensor],
                        params: ParamSelection = None, *, loss=None, max_rows: Optional[int] = None) -> ParamVector:
    """Exact empirical-Fisher-vector product with sequences as examples (module docstring); ``max_rows`` as in
    :func:`hvp`."""
    return _products(model, batches, v, params, loss, _empirical_fisher_batch, max_rows)


class _ProductOperator(CurvatureOperator):
    """An exact product as an operator; ``inverse_mv`` solves with CG (see :class:`~.cg.CGInverse`)."""

    product: Callable = staticmethod(hvp)

    def __init__(self, model: nn.Module, batches: Iterable, params: ParamSelection = None, *, loss=None,
                 cg_tol: float = 1e-6, cg_maxiter: Optional[int] = None, preconditioner=None,
                 max_rows: Optional[int] = None):
        self.model = model
        self.max_rows = max_rows
        self.batches = materialize(batches)
        self.params = select_params(model, params)
        self.param_shapes = {n: p.shape for n, p in self.params.items()}
        self.loss = loss
        self.cg_tol, self.cg_maxiter, self.preconditioner = cg_tol, cg_maxiter, preconditioner

    def _mv(self, v: ParamVector) -> ParamVector:
        return type(self).product(self.model, self.batches, v, list(self.params), loss=self.loss,
                                  max_rows=self.max_rows)

    def _inverse_mv(self, v: ParamVector, damping: float) -> ParamVector:
        from .cg import CGInverse

        solver = CGInverse(self, tol=self.cg_tol, maxiter=self.cg_maxiter, preconditioner=self.preconditioner)
        return solver.inverse_mv(v, damping)


class HessianOperator(_ProductOperator):
    """Exact Hessian of the mean loss over fixed batches (:func:`hvp`)."""

    product = staticmethod(hvp)


class GGNOperator(_ProductOperator):
    """Exact GGN of the mean loss over fixed batches (:func:`ggn_vp`)."""

    product = staticmethod(ggn_vp)


class EmpiricalFisherOperator(_ProductOperator):
    """Exact empirical Fisher over fixed batches (:func:`empirical_fisher_vp`)."""

    product = staticmethod(empirical_fisher_vp)
