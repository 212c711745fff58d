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

The batches run as *passes* (one forward and its backwards each): ``max_rows`` splits a batch into passes of at
most that many rows (less activation memory); ``max_tokens`` merges consecutive batches, right-padded to the
longest, into passes of at most that many tokens (rows x length: fewer, larger matrix products, which small batches
of short sequences need on CPU). Every counted token of batch k carries the weight ``1/(K N_k)`` in whichever pass
it runs, so the passes give the same products up to float rounding. Padding on the right changes no earlier
position's output in a causal model; ``max_tokens`` assumes one.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._pass import materialize, requiring_grad
from .base import CurvatureOperator
from .distributed import all_reduce_counts, all_reduce_sum_
from .sharded import dual_parameters, forward_tensors, is_sharded
from .loss import (CausalLMLoss, call_model, concat_batches, counted_token_losses, curvature_mode, merged,
                   model_device, model_inputs, output_tensor, pad_right, prepare_batch)
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


class _Pass(NamedTuple):
    """One forward's rows: ``batch`` (``input_ids``, ``attention_mask``, ``labels``), ``valid`` the (B, T) counted
    positions, ``scale`` each row's weight (B,): 1 / the counted tokens of the batch the row came from, so that
    ``sum(scale * per-token losses)`` is this pass's share of the sum of batch mean losses."""

    batch: dict
    valid: Tensor
    scale: Tensor


def _token_weights(p: _Pass, dtype: torch.dtype) -> Tensor:
    """(B, T) weight of each position's loss: the row's scale where counted, 0 elsewhere."""
    return p.valid.to(dtype) * p.scale.to(dtype).unsqueeze(1)


def _pass_of(batch: dict, loss) -> _Pass:
    targets = loss.targets(batch)
    valid = loss.valid(targets) & batch["attention_mask"].bool()
    count = valid.sum()
    if int(count) == 0:
        raise ValueError("a batch has every token ignored (labels all -100 or padding): its mean loss is undefined")
    return _Pass(batch, valid, torch.full(valid.shape[:1], 1.0, dtype=torch.float64, device=valid.device) / count)


def _merge(parts: Sequence[_Pass]) -> _Pass:
    """``parts`` as one pass: rows stacked, each right-padded to the longest (:func:`~.loss.concat_batches`)."""
    if len(parts) == 1:
        return parts[0]
    length = max(p.valid.shape[1] for p in parts)
    valid = torch.cat([pad_right(p.valid, length, False) for p in parts])
    return _Pass(concat_batches([p.batch for p in parts]), valid, torch.cat([p.scale for p in parts]))


def _chunks(data: Sequence, device: torch.device, loss, max_rows: Optional[int]) -> Iterator[_Pass]:
    """Each batch of ``data`` as a pass, or in chunks of at most ``max_rows`` rows (a chunk without a counted
    token left out)."""
    for raw in data:
        whole = _pass_of(prepare_batch(raw, device), loss)
        rows = whole.valid.shape[0]
        if max_rows is None or rows <= max_rows:
            yield whole
            continue
        for i in range(0, rows, max_rows):
            part = slice(i, i + max_rows)
            if whole.valid[part].any():
                yield _Pass({k: t[part] for k, t in whole.batch.items()}, whole.valid[part], whole.scale[part])


def _passes(data: Sequence, device: torch.device, loss, max_rows: Optional[int],
            max_tokens: Optional[int]) -> Iterator[_Pass]:
    """The passes of ``data`` (module docstring), in order: :func:`_chunks`, consecutive ones merged while the
    merged pass stays within ``max_tokens`` tokens (rows x longest length) and ``max_rows`` rows."""
    for group in merged(_chunks(data, device, loss, max_rows), lambda p: tuple(p.valid.shape), max_tokens, max_rows):
        yield _merge(group)


def _finish(total: ParamVector, batches: int, device: torch.device) -> ParamVector:
    """The sum over batches (of every rank) divided by their number."""
    all_reduce_sum_(total.values())
    (k,) = all_reduce_counts([float(batches)], device)
    return {n: t / k for n, t in total.items()}


def _weighted_loss(loss, output: Tensor, p: _Pass) -> Tensor:
    """The pass's share of the sum of batch mean losses."""
    losses = counted_token_losses(loss, output, loss.targets(p.batch), p.valid)
    return (losses * _token_weights(p, losses.dtype)).sum()


def _mean_loss_fn(model: nn.Module, p: _Pass, names: Sequence[str], loss) -> Callable:
    from torch.func import functional_call

    def f(*tensors: Tensor) -> Tensor:
        output = output_tensor(functional_call(model, dict(zip(names, tensors)), args=(),
                                               kwargs=model_inputs(model, p.batch)))
        return _weighted_loss(loss, output, p)

    return f


def _hvp_forward_over_reverse(model, p: _Pass, names, primals, tangents, loss) -> tuple[Tensor, ...]:
    from torch.func import grad, jvp

    f = _mean_loss_fn(model, p, names, loss)
    _, hv = jvp(grad(f, argnums=tuple(range(len(names)))), primals, tangents)
    return hv


def _hvp_double_backward(model, p: _Pass, names, primals, tangents, loss) -> tuple[Tensor, ...]:
    value = _weighted_loss(loss, call_model(model, p.batch), p)
    grads = torch.autograd.grad(value, primals, create_graph=True)
    return torch.autograd.grad(grads, primals, grad_outputs=tangents, allow_unused=True)


def hvp(model: nn.Module, batches: Iterable, v: Mapping[str, Tensor], params: ParamSelection = None, *,
        loss=None, method: str = "auto", max_rows: Optional[int] = None,
        max_tokens: Optional[int] = None) -> ParamVector:
    """Exact Hessian-vector product of the mean loss (module docstring). ``method``: ``"auto"`` (forward-over-
    reverse, double backward if the model lacks forward-mode AD), ``"forward"`` or ``"double_backward"``.
    ``max_rows`` / ``max_tokens``: the passes' rows and tokens at most (module docstring; the same product)."""
    if method not in ("auto", "forward", "double_backward"):
        raise ValueError(f"method must be 'auto', 'forward' or 'double_backward', got {method!r}")

    def per_pass(model, p, names, primals, tangents, loss):
        if method == "forward" or (method == "auto" and type(model) not in _NO_FORWARD_AD):
            try:
                return _hvp_forward_over_reverse(model, p, names, tuple(t.detach() for t in primals), tangents, loss)
            except (RuntimeError, NotImplementedError):
                if method == "forward":
                    raise
                _NO_FORWARD_AD.add(type(model))
        return _hvp_double_backward(model, p, names, primals, tangents, loss)

    return _products(model, batches, v, params, loss, per_pass, max_rows, max_tokens)


def _output_jvp(output: Tensor, primals: Sequence[Tensor], tangents: Sequence[Tensor]) -> Tensor:
    """``J v`` of ``output`` w.r.t. ``primals`` by the double-VJP trick (no forward-mode AD needed)."""
    u = torch.zeros_like(output, requires_grad=True)
    vjp = torch.autograd.grad(output, primals, grad_outputs=u, create_graph=True, allow_unused=True)
    pairs = [(g, t) for g, t in zip(vjp, tangents) if g is not None]
    return torch.autograd.grad([g for g, _ in pairs], u, grad_outputs=[t for _, t in pairs], retain_graph=True)[0]


class _ForwardTensors(Sequence):
    """The tensors the named parameters were in the last forward (FSDP2's whole parameters), read when used."""

    def __init__(self, used: Mapping[str, Tensor], names: Sequence[str]):
        self.used, self.names = used, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):
        return self.used[self.names[i]]


def _products(model: nn.Module, batches: Iterable, v: Mapping[str, Tensor], params: ParamSelection, loss,
              per_pass: Callable, max_rows: Optional[int] = None, max_tokens: Optional[int] = None, *,
              sharded_per_pass: Optional[Callable] = None) -> ParamVector:
    """The mean over ``batches`` of the products of their mean losses, in curvature mode, all-reduced: the body
    of :func:`hvp`, :func:`ggn_vp` and :func:`empirical_fisher_vp`. The batches run as passes (:func:`_passes`);
    ``per_pass(model, pass, names, primals, tangents, loss)`` returns the products of one pass's share of the sum
    of batch mean losses w.r.t. ``primals`` (None for an unused one). On an FSDP2-sharded model
    ``sharded_per_pass`` runs instead (None: the product is refused, since FSDP2 frees each layer's whole weights
    after its backward and a double backward would read them), with ``primals`` the whole parameters each forward
    used (read after the forward), one pass per batch."""
    for name, limit in (("max_rows", max_rows), ("max_tokens", max_tokens)):
        if limit is not None and limit < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {limit}")
    loss = loss or CausalLMLoss()
    data, chosen = _prepare(model, batches, v, params)
    names = list(chosen)
    device = model_device(model)
    sharded = any(is_sharded(p) for p in chosen.values())
    if sharded and sharded_per_pass is None:
        raise ValueError("this product needs a double backward through every layer, which an FSDP2-sharded model "
                         "does not keep; the GGN (ggn_vp) runs sharded")
    if sharded:
        per_pass = sharded_per_pass
    if sharded and (max_rows is not None or max_tokens is not None):
        raise ValueError("row chunks and merged batches (max_rows / max_tokens, restore's ggn_rows) do not run on an "
                         "FSDP2-sharded model: ranks whose batches have other shapes would run other numbers of "
                         "forwards")
    total: dict[str, Tensor] = {}
    with curvature_mode(model), requiring_grad(chosen.values()), forward_tensors(model, chosen) as used:
        primals = _ForwardTensors(used, names) if sharded else tuple(chosen[n] for n in names)
        tangents = tuple(v[n].to(chosen[n].dtype) for n in names)
        for p in _passes(data, device, loss, max_rows, max_tokens):
            for n, out in zip(names, per_pass(model, p, names, primals, tangents, loss)):
                if out is not None:
                    total[n] = out.detach() if n not in total else total[n] + out.detach()
    return _finish({n: total[n] if n in total else torch.zeros_like(chosen[n]) for n in names}, len(data), device)


def _ggn_pass(model, p: _Pass, names, primals, tangents, loss):
    output = call_model(model, p.batch)
    jv = _output_jvp(output, primals, tangents)
    hjv = loss.output_hessian_vp(output, loss.targets(p.batch), jv)
    hjv = hjv * _token_weights(p, hjv.dtype).unsqueeze(-1)
    return torch.autograd.grad(output, primals, grad_outputs=hjv.to(output.dtype), allow_unused=True)


def _empirical_fisher_pass(model, p: _Pass, names, primals, tangents, loss):
    output = call_model(model, p.batch)
    per_seq = counted_token_losses(loss, output, loss.targets(p.batch), p.valid).sum(dim=1)  # (B,)
    c = _output_jvp(per_seq, primals, tangents)  # c_n = <g_n, v>
    return torch.autograd.grad(per_seq, primals, grad_outputs=(c * p.scale.to(c.dtype)).detach(),
                               allow_unused=True)


def _ggn_pass_forward_mode(model, p: _Pass, names, primals, tangents, loss):
    """``_ggn_pass`` with ``J v`` in forward mode (dual parameters) instead of a double backward: one forward and
    one ordinary backward, which FSDP2 runs (it frees each layer's whole weights after its backward, so a second
    backward through them would read freed storage)."""
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), dual_parameters(model, dict(zip(names, tangents))):
        output, jv = fwAD.unpack_dual(call_model(model, p.batch))
    jv = torch.zeros_like(output) if jv is None else jv
    hjv = loss.output_hessian_vp(output, loss.targets(p.batch), jv)
    hjv = hjv * _token_weights(p, hjv.dtype).unsqueeze(-1)
    return torch.autograd.grad(output, tuple(primals), grad_outputs=hjv.to(output.dtype), allow_unused=True)


def ggn_vp(model: nn.Module, batches: Iterable, v: Mapping[str, Tensor], params: ParamSelection = None, *,
           loss=None, max_rows: Optional[int] = None, max_tokens: Optional[int] = None) -> ParamVector:
    """Generalised Gauss-Newton-vector product ``J^T H_out J v`` of the mean loss (module docstring);
    ``max_rows`` / ``max_tokens`` as in :func:`hvp`. On an FSDP2-sharded model ``J v`` is taken in forward mode."""
    return _products(model, batches, v, params, loss, _ggn_pass, max_rows, max_tokens,
                     sharded_per_pass=_ggn_pass_forward_mode)


def empirical_fisher_vp(model: nn.Module, batches: Iterable, v: Mapping[str, Tensor],
                        params: ParamSelection = None, *, loss=None, max_rows: Optional[int] = None,
                        max_tokens: Optional[int] = None) -> ParamVector:
    """Exact empirical-Fisher-vector product with sequences as examples (module docstring); ``max_rows`` /
    ``max_tokens`` as in :func:`hvp`."""
    return _products(model, batches, v, params, loss, _empirical_fisher_pass, max_rows, max_tokens)


class _ProductOperator(CurvatureOperator):
    """An exact product as an operator; ``inverse_mv`` solves with CG (see :class:`~.cg.CGInverse`)."""

    product: Callable = staticmethod(hvp)

    def __init__(self, model: nn.Module, batches: Iterable, params: ParamSelection = None, *, loss=None,
                 cg_tol: float = 1e-6, cg_maxiter: Optional[int] = None, preconditioner=None,
                 max_rows: Optional[int] = None, max_tokens: Optional[int] = None):
        self.model = model
        self.max_rows, self.max_tokens = max_rows, max_tokens
        self.batches = materialize(batches)
        self.params = select_params(model, params)
        self.param_shapes = {n: p.shape for n, p in self.params.items()}
        self.loss = loss
        self.cg_tol, self.cg_maxiter, self.preconditioner = cg_tol, cg_maxiter, preconditioner

    def _mv(self, v: ParamVector) -> ParamVector:
        return type(self).product(self.model, self.batches, v, list(self.params), loss=self.loss,
                                  max_rows=self.max_rows, max_tokens=self.max_tokens)

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
