"""Memory and cost of each restore method and of CurvSafe, estimated from the model's shapes alone.

The model may live on the meta device (:func:`meta_model` builds it from a folder holding only ``config.json``,
and an adapter folder holding only ``adapter_config.json``): nothing here reads a weight.

Conventions (what every figure means):

- A **training step** is one forward + backward of one batch (``batch_size x seq_len`` tokens) with the trainable
  parameters (the adapter) getting gradients and an AdamW state. Costs are in training steps of that batch; the
  restore data are ``task_batches`` and ``safety_batches`` such batches.
- **curvature_bytes**: the most the method holds for its curvature at once: for kfac / ekfac the K-FAC factors
  until their decomposition frees them, then the eigenbases (a factor above ``low_rank.max_dense_dim`` as its
  sketch and truncated basis, :mod:`.curvature.lowrank`) and EK-FAC's corrected eigenvalues (restore keeps no
  factor past its decomposition: ``KFAC(keep_factors=False)``); L-BFGS's pairs and CG's vectors; for
  ``"curvsafe"`` its factors (one EMA, kept by its K-FAC for the next refit) and eigenbases together, the
  projection scales and the guard's vectors.
- **peak_bytes**: weights + the method's vectors over the trainable parameters + curvature + the largest transient
  (activations of the pass in flight, plus a fit's per-batch sums). Activations are counted, not modelled: the
  forward runs on the meta device under saved-tensor hooks (:func:`activation_bytes`), with the math SDPA
  backend for the restore's passes (curvature code runs it) and the model's own attention for the training
  step. A GGN-vector product (L-BFGS, CG) keeps tangents and a double-backward graph: three times the
  activations (measured 2.5-3.4x on the shapes of ``benchmarks/scale.py``).
  ``benchmarks/scale.py`` measures these estimates against real peaks.
- With ``screen`` (CurvSafe's example screening, :mod:`.optim.screen`), CurvSafe's peak also counts the
  per-example gradients held from the backward to the step (``batch_size`` rows x the trainable parameters, float32)
  and the step's three adapter-sized vectors (the safety gradient in the examples' layout, the examples' sum and
  the screened rows' sum), plus the whole gradient gathered under FSDP2; they are live through a refresh. The
  per-example products (as many multiply-adds as the adapter's weight gradients) are not counted in its steps.
- **steps_per_iteration**: one restore iteration (refresh every iteration, the default) = the safety and task
  gradients (``S + T`` steps) + one line-search trial forward (``(S + T) / 2``: with the base frozen, a backward
  costs about a forward) + the refresh, over the ``C = min(T, curvature_batches)`` batches the curvature is
  fitted on: K-FAC one pass (``C``; one more with ``LowRank(passes=2)`` when a factor is sketched), EK-FAC one
  when its per-sequence gradients fit (:class:`~.curvature.EKFAC`'s ``max_gradient_bytes``, LoRA blocks) and two
  otherwise (plus that second pass), L-BFGS ``pairs`` GGN-vector products and CG ``1 + cg_iterations`` (each
  ``2 C``: forward with tangents + backward). For ``"curvsafe"`` it is one optimizer step: the training
  step plus its refresh (one safety pass, ``S``, and the guard's gradient) spread over ``refresh_interval``
  steps (~12 on the testbed with ``refresh_tol=0.1``). Eigendecompositions are not counted (device-dependent:
  on a 2-core CPU the dense 2048 x 2048 ones of a 1B model's factors dominate a K-FAC refresh; the truncated
  ones are SVDs of d x 384 sketches; CurvSafe's refreshes after the first take the dense ones of 1024+ dimensions
  by subspace iteration, :mod:`.curvature.subspace`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .capture import find_blocks
from .config import RESTORE_METHODS
from .curvature.ekfac import GRADIENT_BYTES
from .curvature.lowrank import LowRank
from .curvature.subspace import SubspaceEigen
from .curvature.sequence_grads import gradient_bytes, prefer_sequences
from .curvature.sharded import unsplit_blocks

F32 = 4
GGN_COST = 2.0  # training steps per GGN-vector product on the same data
GGN_MEMORY = 3.0  # its activations, in those of a forward + backward (tangents and the double-VJP graph)
FORWARD_COST = 0.5  # a forward, in training steps: with a frozen base the backward costs about one forward
RESTORE_VECTORS = 10  # theta0, best, base, trial, safety/task/combined gradients, direction, step, snapshot


@dataclass
class PlanSettings:
    """What the estimate assumes about the run.

    Attributes:
        batch_size: sequences per batch (one training step).
        seq_len: tokens per sequence.
        task_batches: batches of task data the restore evaluates and fits curvature on.
        curvature_batches: of those, the most the curvature is fitted on (restore's ``curvature_batches``; None:
            all).
        safety_batches: batches of safety data (harmful prompts and their anchors/refusals).
        lbfgs_pairs: L-BFGS curvature pairs per refresh (the restore default).
        cg_iterations: CG iterations per solve (the restore default).
        refresh_interval: optimizer steps between CurvSafe refreshes (the mean, not the cap).
        low_rank: the factor memory bound (None: every factor dense).
        subspace: CurvSafe's warm-started truncated eigenbases of large dense factors
            (``CurvSafeSettings.subspace``; None: full ones).
        ggn_rows: rows per pass of L-BFGS's and CG's GGN-vector products at ``seq_len`` tokens each (restore's
            ``ggn_rows``: batches split, or shorter ones merged, to it; None: ``batch_size``).
        shards: ranks the weights are sharded over with FSDP2 (restore's ``fsdp2``, CurvSafe under
            ``fully_shard``): the estimate is per rank.
        screen: CurvSafe screens examples (``CurvSafeSettings.screen``; module docstring).
    """

    batch_size: int = 8
    seq_len: int = 512
    task_batches: int = 1
    safety_batches: int = 1
    lbfgs_pairs: int = 8
    cg_iterations: int = 10
    refresh_interval: float = 12.0
    low_rank: Optional[LowRank] = field(default_factory=LowRank)
    subspace: Optional[SubspaceEigen] = field(default_factory=SubspaceEigen)
    ggn_rows: Optional[int] = None
    shards: int = 1
    curvature_batches: Optional[int] = None
    screen: bool = False

    def __post_init__(self):
        for name in ("batch_size", "seq_len", "task_batches", "safety_batches", "lbfgs_pairs", "cg_iterations",
                     "shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ggn_rows", "curvature_batches"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        if self.refresh_interval < 1:
            raise ValueError(f"refresh_interval must be >= 1, got {self.refresh_interval}")


@dataclass
class MethodPlan:
    """The estimate for one method (bytes and training steps; module docstring)."""

    curvature_bytes: int
    peak_bytes: int
    steps_per_iteration: float


@dataclass
class Plan:
    """The estimate for one model: per method, plus the training step it is measured against."""

    methods: dict[str, MethodPlan]
    training_step_bytes: int
    weight_bytes: int
    trainable_params: int
    blocks: int
    sketched_factors: int
    settings: dict

    def to_json(self) -> dict:
        return {"methods": {m: asdict(p) for m, p in self.methods.items()},
                "training_step_bytes": self.training_step_bytes, "weight_bytes": self.weight_bytes,
                "trainable_params": self.trainable_params, "blocks": self.blocks,
                "sketched_factors": self.sketched_factors, "settings": self.settings}

    def table(self) -> str:
        lines = [f"{self.blocks} curvature blocks ({self.sketched_factors} factors sketched), "
                 f"{self.trainable_params:,} trainable parameters, weights {gib(self.weight_bytes)}, "
                 f"training step peak {gib(self.training_step_bytes)}",
                 f"{'method':<9} {'curvature':>11} {'peak':>11} {'steps/iteration':>16}"]
        for name, p in self.methods.items():
            lines.append(f"{name:<9} {gib(p.curvature_bytes):>11} {gib(p.peak_bytes):>11} "
                         f"{p.steps_per_iteration:>16.1f}")
        return "\n".join(lines)


def gib(n: int) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def parse_bytes(text: str) -> int:
    """``"80GiB"``, ``"80G"``, ``"512MiB"``, ``"1.5e9"`` -> bytes (binary units; ``G`` means GiB)."""
    units = {"k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}
    s = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = units.get(s[-1:], 1) if s else 1
    number = s[:-1] if s[-1:] in units else s
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"not a memory size: {text!r} (e.g. 80GiB, 512MiB, 1.5e9)") from None
    if not value > 0:
        raise ValueError(f"a memory size must be > 0, got {text!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------------- the model
def meta_model(model_dir: str | Path, adapter_dir: Optional[str | Path] = None, dtype: Optional[str] = None):
    """The model (with its LoRA adapter) on the meta device, from ``config.json`` / ``adapter_config.json`` only."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    torch_dtype = getattr(torch, dtype) if dtype else _config_dtype(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config).to(torch_dtype)
    if adapter_dir is None:
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig.from_pretrained(str(adapter_dir))
    lora.inference_mode = False  # a saved adapter says inference mode (frozen); the plan is for editing it
    return get_peft_model(model, lora)


def _config_dtype(config) -> torch.dtype:
    # transformers >= 4.56 names it dtype (torch_dtype a deprecated alias that warns when read); older ones only
    # torch_dtype, an attribute of the instance
    d = getattr(config, "dtype", None) or vars(config).get("torch_dtype")
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else torch.float32


def _meta_twin(model: nn.Module) -> nn.Module:
    """``model`` itself when it lives on the meta device, else a meta copy built from its config (and LoRA
    config), with the same parameters trainable."""
    if next(model.parameters()).is_meta:
        return model
    from transformers import AutoModelForCausalLM

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(base.config).to(next(model.parameters()).dtype)
    if hasattr(model, "peft_config"):
        from peft import get_peft_model

        twin = get_peft_model(twin, model.peft_config[model.active_adapter])
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in twin.named_parameters():
        p.requires_grad_(flags.get(n, False))
    return twin


def activation_bytes(model: nn.Module, batch_size: int, seq_len: int, *, math_attention: bool = False) -> int:
    """Bytes of one forward + backward of a ``batch_size x seq_len`` batch beyond the weights and the trainable
    state: what autograd saves, counted exactly by running the forward on the meta device with saved-tensor
    hooks (no compute, no memory; each storage once, parameters and buffers excluded), plus the logits the
    output holds and their gradient in the backward (float32 and the model's dtype). ``math_attention``: the
    math SDPA backend, as curvature passes run (it keeps the attention probabilities: ``heads x seq_len`` values
    per token)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    twin = _meta_twin(model)
    weights = {t.untyped_storage()._cdata for t in [*twin.parameters(), *twin.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = max(saved.get(storage._cdata, 0), storage.nbytes())
        return t

    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    attention = sdpa_kernel([SDPBackend.MATH]) if math_attention else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), attention:
        out = twin(input_ids=ids)  # no mask, default cache: HF inspects masks and positions with .item()
    logits = out.logits.numel() * (F32 + 2 * out.logits.element_size())
    return sum(saved.values()) + logits


# ---------------------------------------------------------------------------------------------------- curvature
def _factor(dim: int, low: Optional[LowRank]) -> tuple[int, int, bool]:
    """(factor bytes, eigenbasis bytes, sketched) of one K-FAC factor of this dimension."""
    if low is not None and low.sketched(dim):  # the sketch, probe (and a second pass's test matrix), float64 trace
        # and row count; the kept basis
        return dim * (low.passes * low.width + low.probes) * F32 + 16, (dim * low.rank + low.rank) * F32, True
    return dim * dim * F32, (dim * dim + dim) * F32, False


_SHARED_INPUTS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def shared_input(block_name: str) -> Optional[str]:
    """A key equal for blocks whose input factor is the same matrix (Llama/Qwen/Mistral: q/k/v read one input,
    gate/up another; so do their LoRA ``lora_A`` modules), whose eigenbasis K-FAC computes once; else None."""
    parts = block_name.split(".")
    if len(parts) >= 3 and parts[-2] == "lora_A":
        parts = parts[:-2]
    elif "lora_B" in parts:
        return None
    group = _SHARED_INPUTS.get(parts[-1])
    return None if group is None else ".".join(parts[:-1]) + ":" + group


def kfac_bytes(model: nn.Module, low: Optional[LowRank], modules=None, *,
               subspace: Optional[SubspaceEigen] = None) -> dict[str, int]:
    """K-FAC's factor, eigenbasis and EK-FAC-correction bytes over the blocks ``modules`` selects, how many
    factors are sketched, the largest transient of one factor's eigendecomposition (float64, and with dense
    factors in float32 as EK-FAC's), and what a fit holds beside its factors: ``batch_sums``, one first-pass input
    factor per shared input (:class:`~.curvature.kfac._FitPass`), plus with ``LowRank(passes=2)`` the second
    pass's sums (one sketch per sketched factor and per shared sketched input). Matches
    :meth:`KFAC.curvature_bytes` after ``fit`` and ``eigen`` of every block (blocks that share an input share their
    input factor's eigenbasis, :func:`shared_input`). With ``subspace`` (CurvSafe's), a dense factor it applies to
    keeps ``subspace.rank`` eigenvectors."""
    factors = eigen = corrected = sketched = transient = transient_f32 = batch_sums = 0
    first = one_pass(low)  # the first pass's sketch width
    blocks = find_blocks(model, modules)
    seen_inputs: set[str] = set()
    for b in blocks:
        kept = []
        key = shared_input(b.name)
        for side, dim in (("A", b.d_in), ("G", b.d_out)):
            f, e, s = _factor(dim, low)
            truncated = not s and subspace is not None and subspace.applies(dim)
            e = (dim * subspace.rank + subspace.rank) * F32 if truncated else e
            shared = side == "A" and key is not None and key in seen_inputs
            factors, eigen, sketched = factors + f, eigen + (0 if shared else e), sketched + s
            leader = side == "A" and key is not None and not shared  # the block whose input others share
            batch_sums += _factor(dim, first)[0] if leader else 0
            if s and low.passes > 1:
                batch_sums += dim * low.width * F32 * (2 if leader else 1)
            kept.append(min(dim, low.rank) if s else subspace.rank if truncated else dim)
            transient = max(transient, 5 * 2 * f)  # float64 copies, bases and LAPACK workspace of one factor
            transient_f32 = max(transient_f32, (5 * 2 if s else 5) * f)  # dense factors in float32 (EK-FAC)
        if key is not None:
            seen_inputs.add(key)
        corrected += kept[0] * kept[1] * F32
    return {"factors": factors, "eigen": eigen, "corrected": corrected, "sketched": sketched, "blocks": len(blocks),
            "eigen_transient": transient, "eigen_transient_f32": transient_f32, "batch_sums": batch_sums}


def estimate(model: nn.Module, settings: Optional[PlanSettings] = None, *, modules=None) -> Plan:
    """The plan for ``model`` (meta or real; only shapes and dtypes are read)."""
    settings = settings or PlanSettings()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = sharded_weight_bytes(model, settings.shards)
    train_act = activation_bytes(model, settings.batch_size, settings.seq_len)
    act = activation_bytes(model, settings.batch_size, settings.seq_len, math_attention=True)
    ggn_act = GGN_MEMORY * (act if settings.ggn_rows in (None, settings.batch_size) else
                            activation_bytes(model, settings.ggn_rows, settings.seq_len, math_attention=True))
    vec = trainable * F32
    k = kfac_bytes(model, settings.low_rank, modules)
    # CurvSafe's EMA of fits (one pass each), with its truncated bases of large dense factors
    k_ema = kfac_bytes(model, one_pass(settings.low_rank), modules, subspace=settings.subspace)
    curvature = {m: curvature_of(m, k_ema if m == "curvsafe" else k, trainable) for m in RANKED_METHODS}
    S, T = settings.safety_batches, settings.task_batches
    C = T if settings.curvature_batches is None else min(T, settings.curvature_batches)  # batches of the curvature
    base_steps = S + T + (S + T) * FORWARD_COST
    restore_base = weights + RESTORE_VECTORS * vec
    ek_transient, ek_grads, ek_passes = _ekfac_correction(model, settings, modules)

    def method(curv: int, phases: list[int], steps: float) -> MethodPlan:
        """``phases``: what is live beyond the restore's own vectors in each phase of an iteration."""
        return MethodPlan(int(curv), int(restore_base + max(phases)), float(steps))

    F, E = k["factors"], k["eigen"]
    # K-FAC's phases: the fit (running sums, which become the factors in place, + a batch's sums of the shared
    # inputs or a second pass's sums + the pass), the eigendecompositions (the factors not yet decomposed, the bases
    # so far, one factor's float64 copies), the gradient passes with the bases held
    fit = F + k["batch_sums"]
    kfac_phases = [fit + act, max(F, E) + k["eigen_transient"], E + act]
    ek_eigen = k["eigen_transient_f32"]  # EK-FAC decomposes dense factors in float32 (sketches in float64)
    ek_phases = [fit + act, max(F, E) + ek_eigen]
    lbfgs_vectors = (4 * settings.lbfgs_pairs + 4) * vec
    # LowRank(passes=2): a second pass over the task batches when a factor is sketched
    refine_passes = settings.low_rank.passes - 1 if settings.low_rank is not None and k["sketched"] else 0
    plans = {
        "lbfgs": method(lbfgs_vectors, [lbfgs_vectors + ggn_act, act],
                        base_steps + settings.lbfgs_pairs * GGN_COST * C),
        "kfac": method(curvature["kfac"], kfac_phases, base_steps + C + refine_passes * C),
        "ekfac": method(curvature["ekfac"], [*ek_phases, E + k["corrected"] + act + ek_transient]
                        if ek_passes == 2 else [fit + act + ek_transient + ek_grads,
                                                max(F, E) + ek_eigen + ek_grads,
                                                E + k["corrected"] + ek_grads],
                        base_steps + (ek_passes + refine_passes) * C),
        "cg": method(6 * vec, [6 * vec + ggn_act, act],
                     base_steps + (1 + settings.cg_iterations) * GGN_COST * C),
        "sgd": method(0, [act], base_steps),
    }
    # the optimizer: AdamW (2 states) + gradient + CurvSafe's reference/before copies and guard gradients (4), and
    # the curvature: the factors (their EMA) + eigenbases + the projection scales (~ corrected's size); a refresh
    # adds the fit's running and per-batch sums (merged into the EMA at its end) or one factor's float64 copies
    train_step = weights + 4 * vec + train_act
    curvsafe_curv = curvature["curvsafe"]
    refresh = max(2 * k_ema["factors"] + act, k_ema["eigen_transient"])
    screen = screen_bytes(trainable, settings) if settings.screen else 0
    plans["curvsafe"] = MethodPlan(int(curvsafe_curv),
                                   int(weights + 4 * vec + curvsafe_curv + screen + max(train_act, refresh)),
                                   1.0 + (S + 1.0) / settings.refresh_interval)
    return Plan({m: plans[m] for m in (*RESTORE_METHODS, "curvsafe")}, int(train_step), int(weights), int(trainable),
                k["blocks"], k["sketched"], _settings_dict(settings))


def screen_bytes(trainable: int, settings: PlanSettings) -> int:
    """What CurvSafe's example screening holds at its step (module docstring): the per-example gradients of a
    batch and three adapter-sized vectors, a fourth (the gathered gradient) under FSDP2."""
    return trainable * F32 * (settings.batch_size + 3 + (settings.shards > 1))


def sharded_weight_bytes(model: nn.Module, shards: int) -> int:
    """The weights one rank holds: all of them (``shards=1``), else under FSDP2 (one unit per block HF never
    splits, and the root: embeddings, final norm, head) its 1/``shards`` of every weight, plus the root's whole
    weights (gathered for the whole forward) and two blocks' (the one computing and the one prefetched)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if shards == 1:
        return total
    blocks = sorted((sum(p.numel() * p.element_size() for p in m.parameters()) for m in unsplit_blocks(model)),
                    reverse=True)
    return -(-total // shards) + (total - sum(blocks)) + sum(blocks[:2])


def _ekfac_correction(model: nn.Module, settings: PlanSettings, modules) -> tuple[int, int, int]:
    """EK-FAC's correction on the task data: one block's transient in a batch's backward (its float32 inputs and
    output gradients, padded per sequence or rotated; the inputs it holds until then are those autograd saves),
    the per-sequence gradients a one-pass fit keeps (0 with two passes), and the passes (as :meth:`EKFAC.fit`
    decides: every row a sequence of ``seq_len`` tokens)."""
    blocks = find_blocks(model, modules)
    transient = settings.batch_size * settings.seq_len * max(b.d_in + b.d_out for b in blocks) * F32
    rows = settings.task_batches * settings.batch_size
    grads = gradient_bytes(blocks, rows)
    narrow = all(prefer_sequences(settings.batch_size * settings.seq_len, settings.batch_size, b.d_in, b.d_out,
                                  b.d_in, b.d_out) for b in blocks)
    return (transient, grads, 1) if narrow and grads <= GRADIENT_BYTES else (transient, 0, 2)


def _settings_dict(settings: PlanSettings) -> dict:
    out = asdict(settings)
    out["low_rank"] = None if settings.low_rank is None else asdict(settings.low_rank)
    out["subspace"] = None if settings.subspace is None else asdict(settings.subspace)
    return out


class PeakMemory:
    """Measured peak memory above the level at ``start()`` (to check a plan): the CUDA allocator's peak, or on
    CPU the process's resident set sampled every 2 ms (run it in a fresh process: memory freed earlier and kept by
    the allocator would hide part of the peak)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.peak = self.base = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.rss())

    def stop(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.rss()) - self.base


RANKED_METHODS = ("kfac", "ekfac", "curvsafe")  # whose curvature depends on LowRank.rank


def one_pass(low: Optional[LowRank]) -> Optional[LowRank]:
    """``low`` with one pass per fit: what CurvSafe runs (an EMA of fits cannot take a second pass)."""
    return low if low is None or low.passes == 1 else replace(low, passes=1)


def curvature_of(method: str, k: dict, trainable: int) -> int:
    """The curvature bytes :func:`estimate` gives a K-FAC-based ``method`` from :func:`kfac_bytes`' ``k``."""
    F, E = k["factors"], k["eigen"]
    held = {"kfac": max(F, E), "ekfac": max(F, E + k["corrected"]),
            "curvsafe": F + E + k["corrected"] + 4 * trainable * F32}
    return held[method]


def largest_rank(model: nn.Module, low: LowRank, method: str, budget: int, modules=None, *,
                 subspace: Optional[SubspaceEigen] = SubspaceEigen()) -> Optional[int]:
    """The largest ``low.rank`` (its other settings kept) at which ``method``'s curvature fits ``budget`` bytes;
    None when not even rank 1 does. Curvature grows with the rank (a factor stops being sketched, and becomes
    dense, once its sketch would not be narrower), so this bisects over 1 .. the largest factor dimension.
    ``subspace``: CurvSafe's truncated bases of large dense factors (its default; not bisected)."""
    if method not in RANKED_METHODS:
        raise ValueError(f"method must be one of {RANKED_METHODS}, got {method!r}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    low = one_pass(low) if method == "curvsafe" else low

    def fits(rank: int) -> bool:
        k = kfac_bytes(model, replace(low, rank=rank), modules, subspace=subspace if method == "curvsafe" else None)
        return curvature_of(method, k, trainable) <= budget

    top = max(max(b.d_in, b.d_out) for b in find_blocks(model, modules))
    if not fits(1):
        return None
    lo, hi = 1, top
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def check_fits(plan: Plan, method: str, max_memory: Optional[int]) -> None:
    """Refuse (``MemoryError`` with the estimate) when ``method``'s peak exceeds ``max_memory`` bytes."""
    if max_memory is None:
        return
    p = plan.methods[method]
    if p.peak_bytes > max_memory:
        fits = [m for m, q in plan.methods.items() if q.peak_bytes <= max_memory and m != "curvsafe"]
        raise MemoryError(f"{method} needs about {gib(p.peak_bytes)} at its peak (curvature {gib(p.curvature_bytes)}"
                          f", weights {gib(plan.weight_bytes)}) but --max-memory is {gib(max_memory)}; "
                          + (f"methods that fit: {', '.join(fits)}" if fits else "no method fits: use a smaller "
                             "--batch-size or a larger device"))

