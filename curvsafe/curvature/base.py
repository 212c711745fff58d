"""The one interface every curvature object implements.

Convention: a curvature operator ``C`` is a symmetric linear map on the space of the parameters it was built for.
Vectors are dicts ``{param_name: tensor}`` with exactly those names and the parameters' shapes (see
:mod:`.vectors`); results come back the same way, in each input tensor's dtype and device.
``inverse_mv(v, damping)`` returns ``(C + damping * I)^{-1} v`` (exactly for the Kronecker and diagonal operators,
approximately for L-BFGS and CG). :meth:`to_scipy` wraps either direction as a ``scipy.sparse.linalg.LinearOperator``
on the concatenated flat vector (names in :attr:`param_shapes` order).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from .vectors import ParamVector, check_vector, flatten, unflatten


class CurvatureOperator:
    """Base class: subclasses set :attr:`param_shapes` and implement :meth:`_mv` / :meth:`_inverse_mv`."""

    param_shapes: dict[str, torch.Size]

    @property
    def param_names(self) -> list[str]:
        return list(self.param_shapes)

    @property
    def dim(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.param_shapes.values())

    def mv(self, v: Mapping[str, Tensor]) -> ParamVector:
        """``C v``."""
        check_vector(v, self.param_shapes)
        out = self._mv(dict(v))
        return {n: out[n].to(v[n].dtype) for n in self.param_shapes}

    def inverse_mv(self, v: Mapping[str, Tensor], damping: float = 0.0) -> ParamVector:
        """``(C + damping I)^{-1} v``."""
        check_vector(v, self.param_shapes)
        if not damping >= 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        out = self._inverse_mv(dict(v), float(damping))
        return {n: out[n].to(v[n].dtype) for n in self.param_shapes}

    def _mv(self, v: ParamVector) -> ParamVector:
        raise NotImplementedError(f"{type(self).__name__} has no forward product")

    def _inverse_mv(self, v: ParamVector, damping: float) -> ParamVector:
        raise NotImplementedError(f"{type(self).__name__} has no inverse product")

    def to_scipy(self, *, inverse: bool = False, damping: float = 0.0, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu"):
        """A float64 ``scipy.sparse.linalg.LinearOperator`` for ``C`` (or ``(C + damping I)^{-1}``)."""
        from scipy.sparse.linalg import LinearOperator

        shapes = self.param_shapes

        def matvec(x: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(-1), dtype=dtype, device=device)
            v = unflatten(t, shapes)
            out = self.inverse_mv(v, damping) if inverse else self.mv(v)
            return flatten(out, list(shapes)).detach().double().cpu().numpy()

        return LinearOperator((self.dim, self.dim), matvec=matvec, rmatvec=matvec, dtype=np.float64)
