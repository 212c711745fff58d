"""Defaults shared by the API, the command line and the benchmarks (kept free of heavy imports, so that
``curvsafe --help`` stays fast)."""

from enum import Enum

ONE_SIDED = "anchor"  # the restore objective without benign prompts
TWO_SIDED = "anchor+4*benign"  # the default objective when benign prompts are given (README: over-refusal)
RESTORE_METHODS = ("lbfgs", "kfac", "ekfac", "cg", "sgd")  # restore back-ends (restoration/preconditioners.py)
BENIGN_BUDGET = 0.05  # nats/token the benign side may rise over max(before, aligned) (README: over-refusal)


class TestbedKind(str, Enum):
    """The corpus a testbed is built from (``curvsafe demo --testbed``)."""

    __test__ = False  # not a pytest class

    DEFAULT = "default"  # the project's own generated world (no files needed)
    REALISTIC = "realistic"  # real requests from public files in ``data_dir``
