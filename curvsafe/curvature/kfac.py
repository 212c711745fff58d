"""K-FAC: Kronecker-factored curvature of the linear blocks of a causal LM.

Convention (kept exactly, tested against curvlinops):

- ``kfac_approx="expand"`` (tokens are examples): ``A = mean over non-padding tokens of a a^T`` with ``a`` the block
  input (no bias column: a bias is its own block with curvature ``G``), and ``G = mean over the same tokens of
  g g^T`` with ``g`` the gradient of the **sum** of per-token losses w.r.t. the block output. Neither factor
  depends on batch size or padding.
- ``kfac_approx="reduce"`` (sequences are examples): ``A = mean over sequences of abar abar^T`` with ``abar`` the
  mean of ``a`` over the sequence's non-padding tokens, and ``G = (1 / non-padding tokens) * sum over sequences of
  gsum gsum^T`` with ``gsum`` the sum of ``g`` over the sequence, so that ``G`` has the expand scale.
- Padding (``attention_mask == 0``) never counts. Prompt tokens whose labels are -100 still count in both
  factors: their outputs feed later tokens' losses through attention, so their ``g`` is not zero.
- ``A ⊗ G`` approximates the curvature of the *mean per-token* loss (HF's ``outputs.loss``), the scale of
  :func:`~curvsafe.curvature.hvp.hvp`. Operator vectors for a block's weight are its (d_out, d_in) matrix ``V``
  (Conv1D weights are transposed for this) and ``mv`` gives ``G V A``.
- Factors are float32 and exactly symmetric. Over several batches (and :meth:`KFAC.fit` calls) they are a running
  mean weighted by token (sequence) counts; with ``ema_decay`` ``d`` each fit's own mean ``F_fit`` (over its
  batches, token-weighted) is merged as ``F = d F + (1 - d) F_fit`` (the first fit: ``F = F_fit``), the factors
  of an optimizer that refits its curvature every few steps. Under ``torch.distributed`` sums and
  counts are all-reduced, so every rank holds the factors of the union of the data.
- ``fisher_type``: ``"empirical"`` backpropagates the data labels, ``"mc"`` one label per counted position sampled
  from the model's own predictive distribution (seeded by ``seed`` plus the rank under ``torch.distributed``, so
  that ranks draw independent labels), ``"type2"`` every column of the loss
  Hessian's square root at each position (exact GGN factors, ``sum_s J_s^T H_s J_s``; positions x vocabulary
  backward passes, for tests and tiny models).
- ``fit(batches, gradient=True)`` also keeps ``gradient``, the gradient of the mean per-token loss over the counted
  tokens of the same batches w.r.t. the blocks' weights, and ``mean_loss``, that loss's value (what
  :func:`curvsafe.nll.token_mean_nll` gives in :func:`~.loss.curvature_mode`): by-products of the empirical pass
  (the Fisher's labels are the data's), all-reduced like the factors.
- Computations run in eval mode with the math SDPA backend (see :func:`~curvsafe.curvature.loss.curvature_mode`).
- Memory bound: a factor larger than ``low_rank.max_dense_dim`` (default 2048) is never formed; it is kept as a
  Nyström sketch and used as a truncated eigenbasis with an isotropic rest (:mod:`.lowrank`, which states the
  approximation). ``low_rank=None`` keeps every factor dense. ``factors[name].A`` is then a
  :class:`~.lowrank.SketchedFactor`, and :meth:`KFAC.eigen` returns ``rest_A`` / ``rest_G`` besides the kept
  eigenpairs. With ``LowRank(passes=2)`` a fit takes a second pass over its batches to refine each sketch (one step
  of subspace iteration; :mod:`.lowrank`), with the same Monte Carlo labels as the first.
- ``keep_factors=False`` (an operator fitted once and then only applied, as restore's task curvature): the first
  eigendecomposition frees each factor as soon as it is decomposed (and a distributed fit keeps no per-rank sums),
  so the curvature held is the factors until then and the eigenbases afterwards, never both: about half of
  ``factors + eigenbases``. The operator is the same; a ``fit`` after the decomposition (without :meth:`KFAC.reset`),
  ``ema_decay`` and ``state_dict`` need the factors and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..capture import LinearBlock, ModuleSelection, find_blocks
from ..config import FisherType, KFACApprox, parse_option
from ..kernels import covariance_update, kron_eigen_apply, mirror_lower_
from ._pass import BatchInfo, capture_pass, materialize
from .base import CurvatureOperator
from .distributed import all_reduce_counts, all_reduce_sum_, is_distributed
from .eigen import safe_eigh_many
from .loss import CausalLMLoss, model_device
from .lowrank import LowRank, SketchedFactor, truncated_kron_apply, truncated_vector_apply
from .vectors import ParamVector

Factor = Union[Tensor, SketchedFactor]


@dataclass
class KFactors:
    """The Kronecker factors of one block: ``A`` (d_in, d_in), ``G`` (d_out, d_out), float32, symmetric; a factor
    above the dense limit is a :class:`~.lowrank.SketchedFactor`."""

    A: Factor
    G: Factor


@dataclass
class KEigen:
    """Eigendecomposition of one block's factors: ``A = QA diag(lam_A) QA^T``, ``G = QG diag(lam_G) QG^T``.

    For a truncated factor ``QA`` is (d_in, k) and ``rest_A`` the eigenvalue of every left-out direction
    (``A ≈ QA diag(lam_A) QA^T + rest_A (I - QA QA^T)``); ``None`` for a dense one.
    """

    lam_A: Tensor
    QA: Tensor
    lam_G: Tensor
    QG: Tensor
    rest_A: Optional[Tensor] = None
    rest_G: Optional[Tensor] = None

    @property
    def truncated(self) -> bool:
        return self.rest_A is not None or self.rest_G is not None


def factor_tensors(factors: Iterable[Factor]) -> list[Tensor]:
    """The tensors that hold ``factors`` (for an in-place all-reduce)."""
    return [t for f in factors for t in (f.tensors() if isinstance(f, SketchedFactor) else [f])]


def factor_eigens(named: Mapping[str, Factor], rank: Optional[int], dtype: torch.dtype = torch.float64, *,
                  consume: bool = False, mean_rest: bool = False) -> dict[str, tuple[Tensor, Tensor, Optional[Tensor]]]:
    """``(lam, Q, rest)`` of every factor in ``named``: dense ones by :func:`safe_eigh_many` in ``dtype`` (``rest``
    None), sketched ones as their truncated eigenbasis of ``rank`` (default: the sketch width) and rest. Equal
    factors (shared inputs) are decomposed once and share the result. With ``consume`` (``named`` then a mutable
    mapping) each factor leaves ``named`` as soon as it is decomposed or found equal to another; ``mean_rest``: the
    sketched factors' rest is the plain mean of their left-out directions (:meth:`SketchedFactor.eigen`)."""
    dense = {k: f for k, f in named.items() if not isinstance(f, SketchedFactor)}
    if consume:
        for k in dense:
            del named[k]
    done: dict[str, tuple[Tensor, Tensor, Optional[Tensor]]] = {
        k: (*v, None) for k, v in safe_eigh_many(dense, dtype=dtype, consume=consume).items()}
    del dense
    seen: dict[tuple, list[str]] = {}  # (shape, trace, sum): the distinct sketches so far, compared in full
    twins: dict[str, str] = {}  # name -> the name of an equal sketch
    for key, f in named.items():
        if key not in done:
            candidates = seen.setdefault((tuple(f.Y.shape), float(f.trace()), float(f.Y.sum())), [])
            twin = next((k for k in candidates
                         if torch.equal(named[k].Y, f.Y) and torch.equal(named[k].omega, f.omega)), None)
            if twin is None:
                candidates.append(key)
            else:
                twins[key] = twin
    if consume:
        for key in twins:
            del named[key]
    for key in [k for k in named if k not in done and k not in twins]:
        f = named[key]
        done[key] = f.eigen(rank or f.Y.shape[1], key, mean_rest=mean_rest)
        if consume:
            del f, named[key]
    done.update({key: done[twin] for key, twin in twins.items()})
    return done


class _Sums:
    """Per-block factor sums and the counts that normalise them (the state that all-reduces). While a fit adds to
    them, only the lower triangles of the dense sums are kept up to date (:meth:`add`); :meth:`symmetrize` makes
    them whole once, at the fit's end."""

    def __init__(self, low_rank: Optional[LowRank] = None):
        self.low_rank = low_rank
        self.A: dict[str, Factor] = {}
        self.G: dict[str, Factor] = {}
        self.n_a = 0.0  # tokens (expand) or sequences (reduce)
        self.n_g = 0.0  # tokens in both cases

    def add(self, store: dict[str, Factor], name: str, rows: Tensor) -> None:
        if name not in store and self.low_rank is not None and self.low_rank.sketched(rows.shape[1]):
            store[name] = SketchedFactor.zeros(rows.shape[1], self.low_rank.width, rows.device,
                                               self.low_rank.probes)
        if isinstance(store.get(name), SketchedFactor):
            store[name].add_rows(rows)
        elif name in store:
            covariance_update(rows, store[name], alpha=1.0, beta=1.0, lower_only=True)
        else:
            store[name] = covariance_update(rows, lower_only=True)

    def add_sum(self, store: dict[str, Factor], name: str, part: Factor) -> None:
        """Add the sum ``part`` (kept by its owner) to ``store[name]``."""
        if name in store:
            store[name].add_(part)
        else:
            store[name] = part.clone()

    def symmetrize(self) -> None:
        """Mirror every dense sum's lower triangle onto its upper one (after the :meth:`add` calls of a fit)."""
        for store in (self.A, self.G):
            for f in store.values():
                if isinstance(f, Tensor):
                    mirror_lower_(f)


class _FitPass:
    """The capture callbacks of one :meth:`KFAC.fit`: the factor sums, accumulated in place into ``running``, and
    the weight gradients' sums when the fit keeps the gradient.

    An input shared by several blocks (q/k/v's, gate/up's) is summed once per batch: the first block that reads it
    (a *leader*, in ``leaders``) sums it apart, each other block adds that sum, and the leader adds it at the batch's
    end. Sharing is seen when the second block reads the input, so ``leaders`` carries over between fits; until a
    leader is known, its followers sum the input again (the same result, more work)."""

    def __init__(self, running: _Sums, low_rank: Optional[LowRank], reduce: bool, num_blocks: int,
                 leaders: set[str], tap=None):
        self.running, self.low_rank, self.reduce, self.leaders = running, low_rank, reduce, leaders
        # another reader of the same pass (EK-FAC's one-pass correction): its on_forward(block, a),
        # on_backward(block, g, info) and on_batch_end(info) run before this pass's own
        self.tap = tap
        self.batch = _Sums(low_rank)  # this batch's sums of the leaders' inputs, and its counts
        self.shared_inputs: dict[int, str] = {}  # id of a block input in this batch -> the block that read it first
        self.info = BatchInfo()
        self.grad_sums: list[Optional[Tensor]] = [None] * num_blocks

    def on_forward(self, block: LinearBlock, a: Tensor) -> None:
        if self.tap is not None:
            self.tap.on_forward(block, a)
        first = self.shared_inputs.get(id(a))
        if first is not None:  # the same input as an earlier block (q/k/v): the same A sum
            self.leaders.add(first)
            part = self.batch.A.get(first)
            if part is not None:
                self.running.add_sum(self.running.A, block.name, part)
                return
        else:
            self.shared_inputs[id(a)] = block.name
        rows = KFAC._per_sequence(a.float(), self.info, mean=True) if self.reduce else a
        sums = self.batch if block.name in self.leaders else self.running
        sums.add(sums.A, block.name, rows)

    def on_backward(self, block: LinearBlock, g: Tensor) -> None:
        if self.tap is not None:
            self.tap.on_backward(block, g, self.info)
        rows = KFAC._per_sequence(g.float(), self.info, mean=False) if self.reduce else g
        self.running.add(self.running.G, block.name, rows)

    def on_batch_end(self) -> None:
        if self.tap is not None:
            self.tap.on_batch_end(self.info)
        self.shared_inputs.clear()
        self.batch.n_a += self.info.num_sequences if self.reduce else self.info.num_tokens
        self.batch.n_g += self.info.num_tokens
        KFAC._add_sums(self.running, self.batch)
        self.batch = _Sums(self.low_rank)

    def on_weight_grads(self, grads) -> None:
        for i, g in enumerate(grads):
            if g is not None:
                self.grad_sums[i] = g.float() if self.grad_sums[i] is None else self.grad_sums[i].add_(g.float())


class KFAC(CurvatureOperator):
    """K-FAC factors and operator for the linear blocks of ``model`` (see the module docstring for conventions).

    Example::

        kfac = KFAC(model, modules="lora").fit(batches)
        kfac.factors["...q_proj.lora_A.default"].A
        step = kfac.inverse_mv(grads, damping=1e-3)
    """

    default_eigen_dtype = torch.float64  # K-FAC's eigenvalues are its curvature: small ones to 1e-16 of the top

    def __init__(self, model: nn.Module, modules: ModuleSelection = None, *, fisher_type: str = "empirical",
                 kfac_approx: str = "expand", ema_decay: Optional[float] = None, seed: int = 0, loss=None,
                 progress: Optional[bool] = None, low_rank: Optional[LowRank] = LowRank(),
                 eigen_dtype: Optional[torch.dtype] = None, keep_factors: bool = True):
        kfac_approx = parse_option(KFACApprox, kfac_approx, "kfac_approx").value
        eigen_dtype = self.default_eigen_dtype if eigen_dtype is None else eigen_dtype
        if eigen_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"eigen_dtype must be torch.float32 or torch.float64, got {eigen_dtype}")
        self.eigen_dtype = eigen_dtype  # the precision of the factors' eigendecompositions (dense factors)
        fisher_type = parse_option(FisherType, fisher_type, "fisher_type").value
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if ema_decay is not None and low_rank is not None and low_rank.passes > 1:
            raise ValueError("LowRank(passes=2) refines each sketch over the batches of one fit; an EMA of fits "
                             "needs passes=1")
        if ema_decay is not None and not keep_factors:
            raise ValueError("ema_decay merges each fit into the factors, so it needs keep_factors=True")
        self.model = model
        self.blocks: list[LinearBlock] = find_blocks(model, modules)
        self.fisher_type = fisher_type
        self.kfac_approx = kfac_approx
        self.ema_decay = ema_decay
        self.low_rank = low_rank
        self.keep_factors = keep_factors
        self.seed = seed
        self._verified = False  # whether a pass has checked that the hooks see every use of the weights
        self.loss = loss if loss is not None else CausalLMLoss()
        self.progress = progress
        params = dict(model.named_parameters())
        self.param_shapes = {n: params[n].shape for b in self.blocks for n in b.param_names}
        self.factors: dict[str, KFactors] = {}
        self._sums: Optional[_Sums] = None  # this rank's sums (kept under torch.distributed only)
        self._counts: Optional[tuple[float, float]] = None  # (n_a, n_g) behind the factors (single process)
        self._eigen: dict[str, KEigen] = {}
        self.gradient: dict[str, Tensor] = {}
        self.mean_loss: Optional[float] = None  # with gradient=True: the mean per-token loss of the last fit
        self._generator: Optional[torch.Generator] = None
        self._leaders: set[str] = set()  # blocks whose input other blocks share (learned by the fits)

    # ------------------------------------------------------------------ fitting
    def _make_generator(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=model_device(self.model))
            self._generator.manual_seed(self.seed + (dist.get_rank() if is_distributed() else 0))
        return self._generator

    def fit(self, batches: Iterable, *, gradient: bool = False) -> "KFAC":
        """Accumulate the factors over ``batches`` (HF dicts); returns ``self``.

        With ``gradient`` (empirical Fisher only), ``self.gradient`` becomes the loss gradient over these batches
        (weight names -> weight-shaped tensors). Nothing changes if any batch fails (bad input, non-finite
        gradient, capture error).
        """
        return self._fit(materialize(batches), gradient=gradient)

    def _fit(self, data: list, *, gradient: bool = False, tap=None) -> "KFAC":
        """:meth:`fit` on materialised batches; ``tap`` also reads the pass (see :class:`_FitPass`)."""
        if gradient and self.fisher_type != "empirical":
            raise ValueError("gradient=True needs fisher_type='empirical' (the pass must backpropagate the labels)")
        if self._eigen and not self.keep_factors:
            raise ValueError("this KFAC freed its factors at their eigendecomposition (keep_factors=False), so a "
                             "fit cannot add to them: reset() it first")
        ema = self.ema_decay is not None
        refine = self.low_rank is not None and self.low_rank.passes > 1
        if refine and any(isinstance(f, SketchedFactor) for k in self.factors.values() for f in (k.A, k.G)):
            raise ValueError("LowRank(passes=2) refines the sketches over one fit's batches, so this KFAC cannot add "
                             "more: reset() it, or fit once on all the batches")
        labels = self._make_generator().get_state() if refine else None  # the second pass redraws the same
        acc = _FitPass(_Sums(self.low_rank) if ema else self._running_sums(), self.low_rank,
                       self.kfac_approx == "reduce", len(self.blocks), self._leaders, tap)
        totals = capture_pass(self.model, self.blocks, data, loss=self.loss, fisher_type=self.fisher_type,
                              generator=self._make_generator(), on_forward=acc.on_forward,
                              on_backward=acc.on_backward, info=acc.info, on_batch_end=acc.on_batch_end,
                              desc="K-FAC factors", progress=self.progress,
                              on_weight_grads=acc.on_weight_grads if gradient else None, verify=not self._verified)
        self._verified = True  # the hooks saw every use of the weights; the model's structure does not change
        if gradient:
            self._keep_gradient(acc.grad_sums, totals)
        acc.running.symmetrize()
        self.factors = self._ema_merge(acc.running) if ema else self._factors_of(acc.running)
        self._eigen = {}
        if refine:
            self._refine_sketches(data, labels)
        return self

    def _refine_sketches(self, data: list, labels: Tensor) -> None:
        """The second pass of ``LowRank(passes=2)``: every sketched factor ``F`` (``Y = F Omega`` from the first
        pass) becomes ``Y_2 = F Omega_2`` with ``Omega_2 = orth(Y)``, summed over the same batches with the same
        labels (``labels``: the generator's state before the first pass) and all-reduced. Equal sketches (an input
        shared by q/k/v) get equal ``Omega_2`` (each its own copy, as each keeps its own sketch) and one product
        per batch."""
        omegas: dict[tuple[str, str], Tensor] = {}
        firsts: list[tuple[SketchedFactor, Tensor]] = []  # distinct first-pass sketches and their Omega_2
        for b in self.blocks:
            for side in ("A", "G"):
                f = getattr(self.factors[b.name], side)
                if isinstance(f, SketchedFactor):
                    twin = next((o for g, o in firsts if torch.equal(g.Y, f.Y)), None)
                    if twin is None:
                        twin = torch.linalg.qr(f.Y.double()).Q.to(f.Y.dtype)
                        firsts.append((f, twin))
                    omegas[(b.name, side)] = twin.clone()
        if not omegas:
            return
        sums = {key: torch.zeros_like(omegas[key]) for key in omegas}
        shared: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {}  # input -> (input kept alive, Omega_2, product)
        counts = [0.0, 0.0]
        info, reduce = BatchInfo(), self.kfac_approx == "reduce"

        def add(block: LinearBlock, side: str, x: Tensor) -> None:
            omega = omegas.get((block.name, side))
            if omega is None:
                return
            done = next((part for _, o, part in shared.get(id(x), []) if torch.equal(o, omega)), None)
            if done is not None:  # an input (A side only) another block read with an equal Omega_2
                sums[(block.name, side)].add_(done)
                return
            rows = self._per_sequence(x.float(), info, mean=side == "A") if reduce else x.float()
            part = rows.T @ (rows @ omega)
            sums[(block.name, side)].add_(part)
            if side == "A":
                shared.setdefault(id(x), []).append((x, omega, part))

        def batch_end() -> None:
            shared.clear()
            counts[0] += info.num_sequences if reduce else info.num_tokens
            counts[1] += info.num_tokens

        generator = self._make_generator()
        generator.set_state(labels)
        capture_pass(self.model, self.blocks, data, loss=self.loss, fisher_type=self.fisher_type,
                     generator=generator, on_forward=lambda b, a: add(b, "A", a),
                     on_backward=lambda b, g: add(b, "G", g), info=info, on_batch_end=batch_end,
                     desc="K-FAC sketches, second pass", progress=self.progress, verify=False)
        all_reduce_sum_(list(sums.values()))
        n_a, n_g = all_reduce_counts(counts, model_device(self.model))
        for (name, side), total in sums.items():
            f = self.factors[name]
            refined = getattr(f, side).with_sketch(total / (n_a if side == "A" else n_g), omegas[(name, side)])
            self.factors[name] = KFactors(refined, f.G) if side == "A" else KFactors(f.A, refined)

    def _keep_gradient(self, grad_sums: list[Optional[Tensor]], totals) -> None:
        """``self.gradient`` and ``self.mean_loss`` from the pass's weight-gradient sums (all-reduced)."""
        sums = [g if g is not None else torch.zeros(b.module.weight.shape, device=b.module.weight.device)
                for g, b in zip(grad_sums, self.blocks)]
        all_reduce_sum_(sums)
        loss_sum, count = all_reduce_counts([totals.loss_sum, float(totals.loss_tokens)], model_device(self.model))
        self.gradient = {b.weight_name: g / count for g, b in zip(sums, self.blocks)}
        self.mean_loss = loss_sum / count

    def _factors_of(self, running: _Sums) -> dict[str, KFactors]:
        """The running mean's factors: the sums divided by their counts (over all ranks)."""
        if is_distributed():  # the factors are of the union; this rank's sums stay for the next fit (unless the
            # factors are freed at their decomposition: then the sums are reduced in place and become the factors)
            reduced = self._clone_sums(running) if self.keep_factors else running
            all_reduce_sum_(factor_tensors([*reduced.A.values(), *reduced.G.values()]))
            reduced.n_a, reduced.n_g = all_reduce_counts([reduced.n_a, reduced.n_g], model_device(self.model))
            self._sums = running if self.keep_factors else None
        else:  # the sums become the factors in place (no second copy); a next fit rescales them back
            reduced, self._sums = running, None
            self._counts = (running.n_a, running.n_g)
        for b in self.blocks:
            reduced.A[b.name] /= reduced.n_a
            reduced.G[b.name] /= reduced.n_g
        return {b.name: KFactors(reduced.A[b.name], reduced.G[b.name]) for b in self.blocks}

    def _running_sums(self) -> _Sums:
        """The sums a running-mean fit starts from: this rank's kept sums, or the factors times their counts."""
        if self._sums is not None:
            return self._clone_sums(self._sums)
        sums = _Sums(self.low_rank)
        if self.factors and self._counts is not None:
            sums.n_a, sums.n_g = self._counts
            sums.A = {n: f.A * sums.n_a for n, f in self.factors.items()}
            sums.G = {n: f.G * sums.n_g for n, f in self.factors.items()}
        return sums

    @staticmethod
    def _per_sequence(rows: Tensor, info: BatchInfo, *, mean: bool) -> Tensor:
        seg = info.segments
        sums = rows.new_zeros(seg.rows, rows.shape[1]).index_add_(0, seg.ids, rows)
        if mean:
            sums = sums / seg.offsets.diff().clamp_min(1).to(rows.dtype)[:, None]
        return seg.with_tokens(sums)

    @staticmethod
    def _clone_sums(s: _Sums) -> _Sums:
        c = _Sums(s.low_rank)
        c.A = {k: v.clone() for k, v in s.A.items()}
        c.G = {k: v.clone() for k, v in s.G.items()}
        c.n_a, c.n_g = s.n_a, s.n_g
        return c

    @staticmethod
    def _add_sums(total: _Sums, part: _Sums) -> None:
        for store, other in ((total.A, part.A), (total.G, part.G)):
            for k, v in other.items():
                if k in store:
                    store[k].add_(v)
                else:
                    store[k] = v
        total.n_a += part.n_a
        total.n_g += part.n_g

    def _ema_merge(self, part: _Sums) -> dict[str, KFactors]:
        """The factors with this fit's sums ``part`` merged into their EMA (all-reduced first)."""
        if is_distributed():
            all_reduce_sum_(factor_tensors([*part.A.values(), *part.G.values()]))
            part.n_a, part.n_g = all_reduce_counts([part.n_a, part.n_g], model_device(self.model))
        d, factors = self.ema_decay, {}
        for b in self.blocks:
            A, G = part.A[b.name] / part.n_a, part.G[b.name] / part.n_g
            old = self.factors.get(b.name)
            factors[b.name] = KFactors(A, G) if old is None else KFactors(d * old.A + (1 - d) * A,
                                                                        d * old.G + (1 - d) * G)
        return factors

    def reset(self) -> None:
        """Forget all accumulated statistics."""
        self.factors, self._sums, self._counts, self._eigen, self.gradient = {}, None, None, {}, {}

    # ------------------------------------------------------------------ eigenbasis
    def _require_fit(self) -> None:
        if not self.factors and not self._eigen:
            raise RuntimeError(f"{type(self).__name__} has no factors yet: call .fit(batches) first")

    def eigen(self, name: str) -> KEigen:
        """Cached eigendecomposition of block ``name``'s factors (in :attr:`eigen_dtype`, guarded; see
        :func:`safe_eigh`; a sketched factor gives its truncated eigenbasis and rest, see :mod:`.lowrank`). The
        first call decomposes every block's factors at once: equal factors (the input factors of blocks that
        share an input, such as q/k/v or gate/up) once, dense ones in batched calls of equal sizes."""
        self._require_fit()
        if name not in self._eigen:
            self._eigen = self._all_eigen()
        return self._eigen[name]

    def _all_eigen(self) -> dict[str, KEigen]:
        names = list(self.factors)
        named = {f"{n}.{side}": getattr(f, side) for n, f in self.factors.items() for side in ("A", "G")}
        if not self.keep_factors:  # ``named`` holds the only references: each goes once decomposed
            self.factors, self._sums, self._counts = {}, None, None  # nothing left for a running mean to add to
        low = self.low_rank
        done = factor_eigens(named, low.rank if low is not None else None, self.eigen_dtype,
                             consume=not self.keep_factors, mean_rest=low is not None and low.mean_rest is True)
        return {n: KEigen(*done[f"{n}.A"][:2], *done[f"{n}.G"][:2], done[f"{n}.A"][2], done[f"{n}.G"][2])
                for n in names}

    def curvature_bytes(self) -> int:
        """Bytes this object holds for the curvature: factors, running sums and the eigenbases computed so far."""
        held = [f for k in self.factors.values() for f in (k.A, k.G)]
        if self._sums is not None:
            held += [*self._sums.A.values(), *self._sums.G.values()]
        seen, total = set(), 0
        tensors = [t for f in held for t in (f.held() if isinstance(f, SketchedFactor) else [f])]
        for t in [*tensors, *(t for e in self._eigen.values() for t in (e.QA, e.QG, e.lam_A, e.lam_G))]:
            if t.data_ptr() not in seen:  # shared-input blocks may share eigen tensors
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    # ------------------------------------------------------------------ operator
    def _block_scale(self, block: LinearBlock) -> Tensor:
        """The (d_out, d_in) eigenvalues of the block's curvature in its Kronecker eigenbasis."""
        e = self.eigen(block.name)
        return torch.outer(e.lam_G, e.lam_A)

    def _bias_scale(self, block: LinearBlock) -> Tensor:
        return self.eigen(block.name).lam_G

    def _apply(self, v: ParamVector, transform) -> ParamVector:
        self._require_fit()
        out: ParamVector = {}
        for b in self.blocks:
            e = self.eigen(b.name)
            V = b.as_matrix(v[b.weight_name]).float()
            core = transform(self._block_scale(b))
            out[b.weight_name] = b.from_matrix(
                truncated_kron_apply(V, e.QA, e.lam_A, e.rest_A, e.QG, e.lam_G, e.rest_G, core, transform)
                if e.truncated else kron_eigen_apply(V, e.QA, e.QG, core))
            if b.bias_name:
                rest = None if e.rest_G is None else transform(e.rest_G)
                out[b.bias_name] = truncated_vector_apply(v[b.bias_name].float(), e.QG,
                                                          transform(self._bias_scale(b)), rest)
        return out

    def _mv(self, v: ParamVector) -> ParamVector:
        return self._apply(v, lambda lam: lam)

    def _inverse_mv(self, v: ParamVector, damping: float) -> ParamVector:
        return self._apply(v, lambda lam: 1.0 / (lam + damping))

    def state_dict(self) -> dict:
        """Factors (and running sums) as plain tensors, for saving with ``torch.save``."""
        if not self.keep_factors and self._eigen:
            raise ValueError("this KFAC freed its factors at their eigendecomposition (keep_factors=False): nothing "
                             "to save")
        def saved(f: Factor):
            return f.state() if isinstance(f, SketchedFactor) else f

        return {"fisher_type": self.fisher_type, "kfac_approx": self.kfac_approx,
                "factors": {n: {"A": saved(f.A), "G": saved(f.G)} for n, f in self.factors.items()}}

    def load_state_dict(self, state: dict, device: Optional[torch.device] = None) -> None:
        """Restore :meth:`state_dict`'s factors (moved to ``device`` when given)."""
        names = {b.name for b in self.blocks}
        if set(state["factors"]) != names:
            raise ValueError("saved factors are for different modules than this KFAC's selection")

        def loaded(f) -> Factor:
            if isinstance(f, dict):
                return SketchedFactor.from_state(f, device)
            return f if device is None else f.to(device)

        self.factors = {n: KFactors(loaded(f["A"]), loaded(f["G"])) for n, f in state["factors"].items()}
        self._sums, self._counts, self._eigen = None, None, {}
