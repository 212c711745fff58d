"""Curvature engine: K-FAC/EK-FAC factors, exact Hessian/GGN/Fisher products, diagonal, L-BFGS and CG.

Every operator implements :class:`~.base.CurvatureOperator` (``mv``, ``inverse_mv``, ``to_scipy``) on parameter
dicts ``{param_name: tensor}``. Conventions are stated once, in each module's docstring.
"""

from .base import CurvatureOperator
from .block_fisher import BlockFisherOperator
from .cg import CGInverse, CGResult, conjugate_gradient
from .diag import DiagonalOperator, empirical_fisher_diagonal, hutchinson_hessian_diagonal
from .ekfac import EKFAC
from .hvp import EmpiricalFisherOperator, GGNOperator, HessianOperator, empirical_fisher_vp, ggn_vp, hvp, select_params
from .kfac import KFAC, KEigen, KFactors
from .lbfgs import LBFGSInverse
from .loss import CausalLMLoss, MSELoss, curvature_mode

__all__ = ["CurvatureOperator", "BlockFisherOperator", "KFAC", "KFactors", "KEigen", "EKFAC", "DiagonalOperator",
           "empirical_fisher_diagonal", "hutchinson_hessian_diagonal", "hvp", "ggn_vp", "empirical_fisher_vp",
           "HessianOperator", "GGNOperator", "EmpiricalFisherOperator", "LBFGSInverse", "CGInverse", "CGResult",
           "conjugate_gradient", "CausalLMLoss", "MSELoss", "curvature_mode", "select_params"]
