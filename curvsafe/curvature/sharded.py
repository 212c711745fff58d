"""FSDP2 (``fully_shard``) parameters: DTensor shards outside a forward, whole tensors inside it.

FSDP2 registers each sharded parameter as a DTensor on its module and, for the duration of the module's forward
(and again in its backward), swaps in a whole (unsharded) ``nn.Parameter`` that the forward actually uses. So a
gradient w.r.t. a named parameter must be taken w.r.t. the tensor its forward used (:func:`forward_tensors`);
taking it with ``torch.autograd.grad`` leaves every ``.grad`` as it was, so FSDP's reduce-scatter does not run
into the training gradients. Updates are computed on whole tensors, gathered from the ranks' shards in one
collective (:func:`gather_whole`) and identical on every rank; each rank writes back its own part
(:func:`local_part`); :func:`whole_values` / :func:`assign_whole` do both for a set of named parameters (the
restore loop's snapshots and steps). :func:`shard_model` shards a model as accelerate's FSDP2 auto-wrap does
(``curvsafe restore --fsdp2``). Without FSDP2 the helpers that take any tensor are the identity.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import cache
from typing import Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn


@cache
def _dtensor_type():
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 shard)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def whole(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor (all-gathered: every rank must call it), else ``t``."""
    return t.full_tensor() if is_sharded(t) else t


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (no communication), else ``t``."""
    return t.to_local() if is_sharded(t) else t


def row_chunks(n: int, ranks: int) -> list[int]:
    """Rows of each rank's ``Shard(0)`` chunk of ``n`` rows (``torch.chunk``'s split, as DTensor's)."""
    size = -(-n // ranks)
    return [max(0, min(n, (r + 1) * size) - r * size) for r in range(ranks)]


def gather_whole(params: Sequence[Tensor], shards: Sequence[Tensor]) -> list[Tensor]:
    """The whole tensors of ``shards``, this rank's local pieces of tensors laid out as the DTensors ``params``
    (e.g. a local update of each parameter), on every rank. One all-gather for all of them when every parameter
    is ``Shard(0)`` over the same 1-D mesh (FSDP2's layout) and the shards share a dtype; else one per tensor."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    mesh = params[0].device_mesh
    simple = (mesh.ndim == 1 and len({s.dtype for s in shards}) == 1
              and all(p.device_mesh == mesh and tuple(p.placements) == (Shard(0),) for p in params))
    if not simple:
        return [DTensor.from_local(s, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
                for p, s in zip(params, shards)]
    ranks, group = mesh.size(), mesh.get_group()
    row_numel = [math.prod(p.shape[1:]) for p in params]  # from the global shape: no DTensor op
    sizes = [[rows * k for rows in row_chunks(p.shape[0], ranks)] for p, k in zip(params, row_numel)]
    longest = max(sum(per[r] for per in sizes) for r in range(ranks))
    buffer = torch.zeros(longest, dtype=shards[0].dtype, device=shards[0].device)
    flat = torch.cat([s.reshape(-1) for s in shards])
    buffer[:flat.numel()] = flat
    parts = [torch.empty_like(buffer) for _ in range(ranks)]
    dist.all_gather(parts, buffer, group=group)
    offsets, out = [0] * ranks, []
    for p, per in zip(params, sizes):
        pieces = []
        for r in range(ranks):
            pieces.append(parts[r][offsets[r]:offsets[r] + per[r]])
            offsets[r] += per[r]
        out.append(torch.cat(pieces).reshape(p.shape))
    return out


def local_part(param: Tensor, value: Tensor) -> Tensor:
    """This rank's piece of ``value`` (a whole tensor, the same on every rank) in the layout of the DTensor
    ``param`` (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None).to_local()


def whole_values(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached whole copies of ``params`` by name (the DTensors among them all-gathered in one collective: every
    rank must call it; plain tensors cloned)."""
    sharded = [n for n, p in params.items() if is_sharded(p)]
    out = {n: p.detach().clone() for n, p in params.items() if n not in sharded}
    if sharded:
        with torch.no_grad():
            gathered = gather_whole([params[n] for n in sharded], [params[n].to_local() for n in sharded])
        out.update(zip(sharded, gathered))
    return {n: out[n] for n in params}


def assign_whole(params: Mapping[str, Tensor], values: Mapping[str, Tensor]) -> None:
    """Set each of ``params`` to the whole tensor ``values[name]`` (the same on every rank): a DTensor takes its
    own part (no communication), a plain tensor all of it."""
    with torch.no_grad():
        for n, p in params.items():
            if is_sharded(p):
                p.to_local().copy_(local_part(p, values[n]))
            else:
                p.copy_(values[n])


def unsplit_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks an HF model names as never split (``_no_split_modules``: its decoder layers), FSDP2's units."""
    names = set()
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_model(model: nn.Module, shards: Optional[int] = None) -> nn.Module:
    """Shard ``model`` with FSDP2 over every rank of the process group, in place: ``fully_shard`` on each block
    the model names as never split (HF's ``_no_split_modules``: its decoder layers), then on the root (the
    embeddings, final norm and head), as accelerate's FSDP2 auto-wrap does. The mesh is on CUDA under an NCCL
    group (each rank's current device, set by :func:`curvsafe.ranks.init_from_env`), else on the CPU; FSDP2 moves
    the shards there, so a model loaded on the CPU ends with 1/W of its weights on each GPU.

    ``shards`` (HSDP): each copy of the model is sharded over this many consecutive ranks and the ``W / shards``
    copies replicate one another (FSDP2 on a 2-D mesh ``(replicate, shard)``; e.g. the GPUs of a node per copy, so
    that the per-forward all-gathers stay inside a node). Default: one copy over all ranks (a 1-D mesh)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized() or dist.get_world_size() < 2:
        raise ValueError("FSDP2 sharding needs a torch.distributed process group of at least 2 ranks (start the "
                         "run with torchrun or accelerate launch)")
    ranks = dist.get_world_size()
    if shards is not None and not (1 <= shards <= ranks and ranks % shards == 0):
        raise ValueError(f"shards must divide the {ranks} ranks (each model copy over that many), got {shards}")
    blocks = unsplit_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no blocks to shard (HF's _no_split_modules); FSDP2 "
                         "sharding needs them")
    device_type = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    mesh = (init_device_mesh(device_type, (ranks,)) if shards is None or shards == ranks else
            init_device_mesh(device_type, (ranks // shards, shards), mesh_dim_names=("replicate", "shard")))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def shard_rows(param: Tensor) -> tuple[int, int]:
    """The rows ``[start, stop)`` of the whole tensor that this rank's shard of the FSDP2 parameter ``param``
    holds (``Shard(0)`` on one mesh dimension, replicated on any other; no communication)."""
    from torch.distributed.tensor import Shard

    (dim,) = [i for i, p in enumerate(param.placements) if isinstance(p, Shard)]
    mesh = param.device_mesh
    chunks = row_chunks(param.shape[0], mesh.size(dim))
    start = sum(chunks[:mesh.get_coordinate()[dim]])
    return start, start + param.to_local().shape[0]


def whole_zeros(t: Tensor) -> Tensor:
    """Zeros of the whole tensor's shape (no communication), like ``torch.zeros_like`` of a plain tensor."""
    return torch.zeros(t.shape, dtype=t.dtype, device=t.device) if is_sharded(t) else torch.zeros_like(t)


@contextmanager
def root_unsharded(model: nn.Module) -> Iterator[None]:
    """For the block, the FSDP2 root ``model``'s own parameters (embeddings, final norm, head) whole, for calls
    that enter the model below its root's hooks (HF ``generate`` calls the inner ``*ForCausalLM``; the inner
    units unshard themselves as usual). A no-op for other models."""
    fsdp_module = None
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        fsdp_module = model if isinstance(model, FSDPModule) else None
    if fsdp_module is None:
        yield
        return
    # FSDP2 initialises its states lazily at the first forward, taking the first module called as the root: set
    # them up from the real root first, or the inner call would make its first layer a root of its own
    fsdp_module._get_fsdp_state()._lazy_init()
    fsdp_module.unshard()
    try:
        yield
    finally:
        fsdp_module.reshard()


@contextmanager
def forward_tensors(model: nn.Module, params: Mapping[str, Tensor]) -> Iterator[dict[str, Tensor]]:
    """Record, by name, the tensor each of ``params`` (named as in ``model.named_parameters()``) is while its
    module runs forward: the parameter itself, or FSDP2's whole parameter. Yields the record (filled by the
    forwards run inside the block); a parameter not reached keeps its own entry."""
    used = dict(params)
    handles = []
    if any(is_sharded(p) for p in params.values()):
        by_module: dict[str, list[tuple[str, str]]] = {}
        for name in params:
            owner, _, attr = name.rpartition(".")
            by_module.setdefault(owner, []).append((name, attr))
        for owner, entries in by_module.items():
            def record(module, args, entries=entries):
                for name, attr in entries:
                    used[name] = getattr(module, attr)
            handles.append(model.get_submodule(owner).register_forward_pre_hook(record))
    try:
        yield used
    finally:
        for h in handles:
            h.remove()


@contextmanager
def dual_parameters(model: nn.Module, tangents: Mapping[str, Tensor]) -> Iterator[None]:
    """Inside a ``torch.autograd.forward_ad.dual_level()``: each parameter named in ``tangents`` enters its module's
    forward as a dual tensor (primal: the tensor the module holds then, FSDP2's whole parameter under sharding;
    tangent: ``tangents[name]``, a whole tensor), so the outputs carry ``J v`` as their tangent and still
    backpropagate to the primal; the module holds its own parameter again once its forward returns. Register it
    after :func:`forward_tensors`, whose record must be the primal."""
    import torch.autograd.forward_ad as fwAD

    by_module: dict[str, list[tuple[str, str]]] = {}
    for name in tangents:
        owner, _, attr = name.rpartition(".")
        by_module.setdefault(owner, []).append((name, attr))
    held: list[tuple[nn.Module, dict]] = []  # modules in forward (nested: last in, first out), their own tensors
    handles = _tangents_around_fsdp_inputs(model)
    for owner, entries in by_module.items():
        def enter(module, args, entries=entries):
            own = {attr: module._parameters[attr] for _, attr in entries}
            held.append((module, own))
            for name, attr in entries:  # the registry itself: a dual tensor is not an nn.Parameter
                module._parameters[attr] = fwAD.make_dual(own[attr], tangents[name].to(own[attr].dtype))

        def leave(module, args, output):
            module._parameters.update(held.pop()[1])

        module = model.get_submodule(owner)
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        while held:  # a forward that raised: its modules get their own tensors back
            module, own = held.pop()
            module._parameters.update(own)


def _tangents_around_fsdp_inputs(model: nn.Module) -> list:
    """Hooks that carry forward-mode tangents past FSDP2's pre-forward, which passes a unit's inputs through an
    autograd Function (to run its post-backward) whose jvp does not return views, so a dual input fails there:
    the first hook (before FSDP2's) holds the inputs' tangents and hands FSDP2 the primals, the second (after
    it) makes the inputs FSDP2 passes on dual again with the held tangents."""
    import torch.autograd.forward_ad as fwAD
    from torch.distributed.fsdp import FSDPModule

    held: list[list] = []
    handles = []

    def split(value):
        primal, tangent = fwAD.unpack_dual(value) if isinstance(value, Tensor) else (value, None)
        return (value, None) if tangent is None else (primal, tangent)

    def strip(module, args, kwargs):
        args_split, kwargs_split = [split(a) for a in args], {k: split(v) for k, v in kwargs.items()}
        held.append(([t for _, t in args_split], {k: t for k, (_, t) in kwargs_split.items()}))
        return tuple(a for a, _ in args_split), {k: v for k, (v, _) in kwargs_split.items()}

    def reattach(module, args, kwargs):
        arg_tangents, kwarg_tangents = held.pop()

        def dual(value, tangent):
            return value if tangent is None else fwAD.make_dual(value, tangent)

        return (tuple(dual(a, t) for a, t in zip(args, arg_tangents)),
                {k: dual(v, kwarg_tangents.get(k)) for k, v in kwargs.items()})

    for module in model.modules():
        if isinstance(module, FSDPModule):
            handles.append(module.register_forward_pre_hook(strip, prepend=True, with_kwargs=True))
            handles.append(module.register_forward_pre_hook(reattach, with_kwargs=True))
    return handles
