"""Parameter-space vectors: dicts ``{param_name: tensor}`` shaped like the parameters, and their flat form."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

ParamVector = dict[str, Tensor]


def check_vector(v: Mapping[str, Tensor], shapes: Mapping[str, torch.Size], what: str = "vector") -> None:
    """Raise ``ValueError`` unless ``v`` has exactly the names of ``shapes`` with the same shapes."""
    if not isinstance(v, Mapping):
        raise TypeError(f"{what} must be a dict {{param_name: tensor}}, got {type(v).__name__}")
    missing, extra = sorted(set(shapes) - set(v)), sorted(set(v) - set(shapes))
    if missing or extra:
        raise ValueError(f"{what} names do not match the parameters: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in shapes.items():
        if tuple(v[name].shape) != tuple(shape):
            raise ValueError(f"{what}[{name!r}] has shape {tuple(v[name].shape)}, parameter has {tuple(shape)}")


def flatten(v: Mapping[str, Tensor], names: list[str]) -> Tensor:
    """The tensors of ``v`` in ``names`` order, flattened and concatenated."""
    return torch.cat([v[n].reshape(-1) for n in names])


def unflatten(flat: Tensor, shapes: Mapping[str, torch.Size]) -> ParamVector:
    """The inverse of :func:`flatten`: views of ``flat`` with ``shapes`` (its length must match)."""
    out, offset = {}, 0
    for name, shape in shapes.items():
        n = int(torch.Size(shape).numel())
        out[name] = flat[offset:offset + n].view(shape)
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} entries, the parameters {offset}")
    return out


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """The inner product ``sum_n <a[n], b[n]>`` of two parameter vectors (a 0-dim tensor)."""
    return sum((a[n].double() * b[n].double()).sum() for n in a)


def host_floats(values: Sequence[Tensor]) -> list[float]:
    """0-d tensors read to the host together, as float64 values in order: one wait per device they live on, where
    ``float(t)`` for each would wait once per value."""
    out: list[float] = [0.0] * len(values)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(values):
        by_device.setdefault(t.device, []).append(i)
    for indices in by_device.values():
        for i, v in zip(indices, torch.stack([values[i].double() for i in indices]).tolist()):
            out[i] = v
    return out
