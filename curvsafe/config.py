"""Defaults shared by the API, the command line and the benchmarks (kept free of heavy imports, so that
``curvsafe --help`` stays fast)."""

from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any, Mapping, Optional, TypeVar

ONE_SIDED = "anchor"  # the restore objective without benign prompts
TWO_SIDED = "anchor+4*benign"  # the default objective when benign prompts are given (README: over-refusal)
BENIGN_BUDGET = 0.05  # nats/token the benign side may rise over max(before, aligned) (README: over-refusal)


class FisherType(str, Enum):
    """Which labels the curvature passes backpropagate (K-FAC, EK-FAC, the Fisher diagonal)."""

    EMPIRICAL = "empirical"  # the data's labels
    MC = "mc"  # one label per counted position, sampled from the model's predictive distribution
    TYPE2 = "type2"  # every column of the loss Hessian's square root: exact GGN factors (tests, tiny models)


class KFACApprox(str, Enum):
    """What K-FAC takes as an example (see :mod:`curvsafe.curvature.kfac`)."""

    EXPAND = "expand"  # every token
    REDUCE = "reduce"  # every sequence


class Method(str, Enum):
    """``curvsafe restore --method``: a curvature back-end of the restore loop or a baseline."""

    LBFGS = "lbfgs"  # the paper's: L-BFGS on task GGN products
    KFAC = "kfac"
    EKFAC = "ekfac"
    CG = "cg"  # truncated Newton on exact GGN products
    SGD = "sgd"  # no curvature
    REVERT = "revert"  # baselines (restoration/baselines.py)
    SAFELORA = "safelora"
    RESTA = "resta"


RESTORE_METHODS = tuple(m.value for m in (Method.LBFGS, Method.KFAC, Method.EKFAC, Method.CG, Method.SGD))
BASELINE_METHODS = tuple(m.value for m in (Method.REVERT, Method.SAFELORA, Method.RESTA))

E = TypeVar("E", bound=Enum)


def parse_option(cls: type[E], value, what: str, allowed: tuple = ()) -> E:
    """``value`` as a member of ``cls`` (restricted to ``allowed`` members when given), or a ``ValueError`` that
    names the option and its valid values."""
    valid = [m.value for m in (allowed or cls)]
    try:
        member = cls(value)
    except ValueError:
        member = None
    if member is None or member.value not in valid:
        raise ValueError(f"{what} must be one of {tuple(valid)}, got {value!r}")
    return member


class TestbedKind(str, Enum):
    """The corpus a testbed is built from (``curvsafe demo --testbed``)."""

    __test__ = False  # not a pytest class

    DEFAULT = "default"  # the project's own generated world (no files needed)
    REALISTIC = "realistic"  # real requests from public files in ``data_dir``


DTYPES = ("float32", "float64", "bfloat16", "float16")


def setting(text: str, **kw) -> Any:
    """A dataclass field of a settings class with its help text."""
    return field(metadata={"help": text}, **kw)


class Settings:
    """Base of the validated settings dataclasses (:class:`RestoreConfig`,
    :class:`~curvsafe.optim.CurvSafeSettings`): built from defaults plus named replacements, a help text per field,
    ``to_dict`` for the saved records."""

    @classmethod
    def from_settings(cls, config: Optional["Settings"], settings: Mapping[str, Any]):
        """``config`` (default: the defaults) with ``settings`` (field names) replaced; unknown names are a
        ``TypeError`` naming them."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise TypeError(f"unknown {cls.__name__} setting(s) {unknown}; the settings are {sorted(names)}")
        base = {f.name: getattr(config, f.name) for f in fields(cls)} if config is not None else {}
        return cls(**{**base, **settings})

    @classmethod
    def help(cls, name: str) -> str:
        """The help text of field ``name`` (the CLI's option help)."""
        return next(f.metadata["help"] for f in fields(cls) if f.name == name)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RestoreConfig(Settings):
    """The settings of a restore run, shared by :func:`~curvsafe.restoration.run_restore`, ``curvsafe restore``
    (its options are these fields, their help these texts) and ``report.json`` (``config``: every run records all
    of them). Validated on construction; files and folders are :func:`run_restore`'s own arguments."""

    method: str = setting("kfac | ekfac | lbfgs | cg | sgd (curvature back-ends; lbfgs is the paper's) or revert | "
                        "safelora | resta (baselines); kfac, the default, met the targets on the most testbed seeds "
                        "at a quarter of lbfgs's cost per iteration (README)", default=Method.KFAC.value)
    objective: Optional[str] = setting("anchor | refusal | harmful | benign terms, summed with optional weights, e.g. "
                                     "anchor+4*benign (default: anchor+4*benign with benign prompts, else anchor)",
                                     default=None)
    task_budget: float = setting("allowed relative rise of the task loss", default=0.02)
    task_budget_abs: float = setting("absolute floor of the budget (nats/token)", default=0.01)
    benign_budget: Optional[float] = setting(
        "with benign prompts: how far the NLL of the aligned model's answers to them may rise over max(before, "
        f"aligned), nats/token (default {BENIGN_BUDGET}); None (CLI: off): no constraint", default=BENIGN_BUDGET)
    iterations: int = setting("the most accepted steps (on the testbeds every method stops at this cap; 16 meets "
                              "the targets on as many seeds as 8 or more for every back-end, 24 and 32 on no more "
                              "than 16 for kfac and ekfac)", default=16)
    damping: float = setting("relative damping of the task curvature", default=0.1)
    curvature_seed: int = setting("kfac / ekfac: seed of the Monte Carlo labels drawn for the task curvature (rank r "
                                  "draws with seed + r); restores differ by seed as much as by method on the "
                                  "testbed, so compare over several", default=0)
    select_top: Optional[int] = setting("restore on the K most influential safety examples", default=None)
    params: Optional[list[str]] = setting("parameter-name globs to edit (default: the adapter)", default=None)
    batch_size: int = setting("examples per batch", default=16)
    max_length: int = setting("tokens per example, at most (and at most the model's context)", default=128)
    limit: Optional[int] = setting("use only the first N examples of each file", default=None)
    dtype: str = setting("the weights' dtype", default="float32")
    device: str = setting("torch device, e.g. cpu or cuda:0", default="cpu")
    max_dense_dim: int = setting("kfac / ekfac: K-FAC factors up to this dimension are dense; larger ones are "
                                 "sketched and kept as a truncated eigenbasis (the memory bound; see `curvsafe plan`)",
                                 default=2048)
    rank: int = setting("kfac / ekfac: eigenvectors kept per truncated factor", default=256)
    sketch_passes: int = setting("kfac / ekfac: passes per curvature fit when a factor is truncated; 2 refines each "
                                 "sketch (a more accurate basis for one more forward and backward of the task data)",
                                 default=1)
    curvature_batches: Optional[int] = setting(
        "fit the task curvature (every method's metric) on at most this many task batches, evenly spaced over them "
        "(per rank); the task loss and its budget still use every batch. Caps the cost of an iteration when the task "
        "file is large (default: all)", default=None)
    ggn_rows: Optional[int] = setting("lbfgs / cg: rows per pass of each GGN-vector product: batches are split "
                                    "into passes of this many rows (the same product, less activation memory), "
                                    "and consecutive batches of shorter sequences merged up to this many rows x "
                                    "max_length tokens (default: batch_size)", default=None)
    max_memory: Optional[int] = setting("refuse before loading weights when the method's estimated peak exceeds this "
                                      "many bytes; lbfgs / cg first try GGN row chunks that fit (default: the "
                                      "CUDA device's memory; see `curvsafe plan`)", default=None)
    fsdp2: bool = setting("under a launcher (torchrun / accelerate launch): shard the model with FSDP2 over the "
                          "ranks, each holding 1/W of the weights (the curvature methods; a LoRA adapter)",
                          default=False)
    shards: Optional[int] = setting("with fsdp2, HSDP: shard each copy of the model over this many consecutive ranks "
                                    "(e.g. the GPUs of a node) and replicate the copies (default: one copy over "
                                    "all ranks)", default=None)

    def __post_init__(self):
        self.method = parse_option(Method, self.method, "method").value
        for name in ("task_budget", "task_budget_abs"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.benign_budget is not None and not self.benign_budget >= 0:
            raise ValueError(f"benign_budget must be >= 0 or None, got {self.benign_budget}")
        if not self.damping > 0:
            raise ValueError(f"damping must be > 0, got {self.damping}")
        for name, low in (("iterations", 1), ("batch_size", 1), ("max_length", 2), ("curvature_seed", 0),
                          ("max_dense_dim", 1), ("rank", 1)):
            if not getattr(self, name) >= low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.sketch_passes not in (1, 2):
            raise ValueError(f"sketch_passes must be 1 or 2, got {self.sketch_passes}")
        if self.shards is not None and not self.fsdp2:
            raise ValueError("shards (HSDP) needs fsdp2")
        for name in ("select_top", "limit", "max_memory", "ggn_rows", "shards", "curvature_batches"):
            if getattr(self, name) is not None and not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.params is not None:
            self.params = list(self.params)

    def low_rank(self):
        """The memory bound of the K-FAC factors (:class:`~curvsafe.curvature.lowrank.LowRank`) these settings ask
        for."""
        from .curvature.lowrank import LowRank

        return LowRank(max_dense_dim=self.max_dense_dim, rank=self.rank, passes=self.sketch_passes)

    def ggn_tokens(self) -> Optional[int]:
        """The tokens of one pass of L-BFGS's and CG's GGN products at most: a batch's worth at full length
        (``ggn_rows`` or ``batch_size`` rows x ``max_length``), the activations the plan prices, so that task
        batches of short sequences are merged up to it. None under FSDP2 (one pass per batch: every rank must run
        the same forwards)."""
        return None if self.fsdp2 else (self.ggn_rows or self.batch_size) * self.max_length

    def loss_tokens(self) -> Optional[int]:
        """The tokens of one pass of the restore's loss values and gradients at most: a batch's worth at full length
        (``batch_size x max_length``, the activations of the training step the plan prices), so that batches of
        short sequences are merged up to it. None under FSDP2 (as :meth:`ggn_tokens`)."""
        return None if self.fsdp2 else self.batch_size * self.max_length
