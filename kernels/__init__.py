"""Fused curvature ops (installed as ``curvsafe.kernels``): Triton on GPU, C++ on CPU, PyTorch everywhere.

Each op lives in its own module with its kernels, launcher and dispatch; :mod:`.reference` holds the PyTorch
ground truth. All results are fp32; inputs may be fp32, fp16 or bf16.

Imported as a top-level ``kernels`` (Python started at the checkout's root puts this folder on ``sys.path``: ``python
-c``, ``python -m``, a notebook, setuptools building the checkout), the module hands that name to the installed
package of that name, Hugging Face's ``kernels`` (a dependency of recent transformers, which imports it), when there
is one; otherwise, and as ``curvsafe.kernels``, it is this package.
"""

import sys
from importlib.machinery import PathFinder
from importlib.util import module_from_spec
from pathlib import Path


def _installed_spec():
    """The spec of a top-level ``kernels`` installed outside this checkout, or None."""
    checkout = Path(__file__).resolve().parent.parent
    path = [p for p in sys.path if Path(p or ".").resolve() != checkout]
    return PathFinder.find_spec("kernels", path)


_spec = _installed_spec() if __name__ == "kernels" else None
if _spec is not None:  # give the name to the installed package; importers receive it from sys.modules
    _installed = module_from_spec(_spec)
    sys.modules["kernels"] = _installed
    _spec.loader.exec_module(_installed)
else:
    from ._dispatch import BACKENDS, choose_backend
    from .covariance import covariance_update, mirror_lower_
    from .fisher_diag import linear_fisher_diag
    from .fisher_vp import linear_fisher_vp
    from .kron_eigen import kron_eigen_apply

    __all__ = ["BACKENDS", "choose_backend", "covariance_update", "mirror_lower_", "linear_fisher_vp",
               "linear_fisher_diag", "kron_eigen_apply"]
