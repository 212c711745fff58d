"""Fused curvature ops (installed as ``curvsafe.kernels``): Triton on GPU, C++ on CPU, PyTorch everywhere.

Each op lives in its own module with its kernels, launcher and dispatch; :mod:`.reference` holds the PyTorch
ground truth. All results are fp32; inputs may be fp32, fp16 or bf16.
"""

from ._dispatch import BACKENDS, choose_backend
from .covariance import covariance_update, mirror_lower_
from .fisher_diag import linear_fisher_diag
from .fisher_vp import linear_fisher_vp
from .kron_eigen import kron_eigen_apply

__all__ = ["BACKENDS", "choose_backend", "covariance_update", "mirror_lower_", "linear_fisher_vp",
           "linear_fisher_diag", "kron_eigen_apply"]
