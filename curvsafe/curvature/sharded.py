"""FSDP2 (``fully_shard``) parameters: DTensor shards outside a forward, whole tensors inside it.

FSDP2 registers each sharded parameter as a DTensor on its module and, for the duration of the module's forward
(and again in its backward), swaps in a whole (unsharded) ``nn.Parameter`` that the forward actually uses. So a
gradient w.r.t. a named parameter must be taken w.r.t. the tensor its forward used (:func:`forward_tensors`);
taking it with ``torch.autograd.grad`` leaves every ``.grad`` as it was, so FSDP's reduce-scatter does not run
into the training gradients. Updates are computed on whole tensors (:func:`whole`), identical on every rank, and
each rank writes back its own shard (:func:`assign_whole_`). Without FSDP2 every helper is the identity.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn


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


def whole_zeros(t: Tensor) -> Tensor:
    """Zeros of the whole tensor's shape (no communication), like ``torch.zeros_like`` of a plain tensor."""
    return torch.zeros(t.shape, dtype=t.dtype, device=t.device) if is_sharded(t) else torch.zeros_like(t)


def assign_whole_(param: Tensor, value: Tensor) -> None:
    """``param.copy_(value)`` with ``value`` the whole tensor (the same on every rank): a DTensor keeps its shard
    of it (no communication)."""
    if is_sharded(param):
        from torch.distributed.tensor import distribute_tensor

        shard = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(value)


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
