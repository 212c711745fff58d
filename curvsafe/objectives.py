"""Safety and task objectives shared by ``restore`` and the ``CurvSafe`` optimizer, computed on HF batches.

Every objective is a mean NLL per counted response token over a fixed set of batches (token-weighted), the
convention of :mod:`curvsafe.curvature.loss`:

- ``anchor`` (default): the NLL of the **aligned** model's own greedy responses to the harmful prompts (its
  refusals), generated once with the adapter disabled; lowering it makes the model behave like the anchor.
- ``refusal``: the NLL of refusal texts given with the prompts.
- ``harmful``: minus the NLL of given harmful responses (raising their NLL), floored at the aligned model's NLL
  on the same data: once that level is reached the term is flat.
- ``benign``: the other side of ``anchor``: the NLL of the aligned model's own greedy responses to benign
  requests (look-alikes of the harmful ones, which it answers); it keeps a restoration from refusing them too.
- ``task``: the NLL of the fine-tuning task's responses.

A combined safety objective is a weighted sum, e.g. ``"anchor+harmful"`` (weights 1 each) or
``{"anchor": 1.0, "harmful": 0.5}``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .anchors import anchor_responses, keep_response_prefix
from .curvature.distributed import all_reduce_counts, all_reduce_sum_
from .curvature.loss import IGNORE_INDEX, curvature_mode, prepare_batch
from .curvature.sharded import forward_tensors, whole_zeros
from .data import Pair, make_batches
from .nll import batch_nll_sums, counted

OBJECTIVES = ("anchor", "refusal", "harmful", "benign")
HARMFUL_SIDE = ("anchor", "refusal", "harmful")  # the terms computed on the harmful prompts


def parse_objective(spec: Union[str, Mapping[str, float]],
                    allowed: Sequence[str] = OBJECTIVES) -> dict[str, float]:
    """``"anchor+harmful"``, ``"anchor+4*benign"`` or ``{"anchor": 1, "benign": 4}`` -> validated weights (at
    least one term on the harmful prompts)."""
    if isinstance(spec, str):
        weights = {}
        for part in spec.split("+"):
            factor, _, name = part.strip().rpartition("*")
            try:
                weights[name.strip()] = float(factor) if factor else 1.0
            except ValueError:
                raise ValueError(f"objective term {part!r}: expected NAME or WEIGHT*NAME") from None
    else:
        weights = dict(spec)
    if any(not w > 0 for w in weights.values()):
        raise ValueError(f"objective weights must be > 0, got {spec!r}")
    unknown = [k for k in weights if k not in allowed]
    if unknown or not weights:
        raise ValueError(f"objective terms must be among {tuple(allowed)}, got {spec!r}")
    if not any(k in HARMFUL_SIDE for k in weights):
        raise ValueError(f"the objective needs a term on the harmful prompts ({', '.join(HARMFUL_SIDE)}), got "
                         f"{spec!r}")
    return weights


@dataclass
class LossTerm:
    """``weight * sign * NLL`` over ``batches``, with an optional floor on the NLL when raising it."""

    name: str
    batches: list
    weight: float = 1.0
    sign: float = 1.0  # -1 raises the NLL
    ceiling: Optional[float] = None  # for sign -1: the NLL above which the term stops pushing
    tokens: int = field(default=0)

    def __post_init__(self):
        self.tokens = sum(int(counted(prepare_batch(b)).sum()) for b in self.batches)
        if self.tokens == 0:
            raise ValueError(f"the {self.name} data has no response tokens")


class Objective:
    """A weighted sum of loss terms evaluated on a model: :meth:`evaluate`, :meth:`term_values`, and
    :meth:`gradient` over ``params``. Under ``torch.distributed`` each rank holds its own batches of every term
    and all of these return the values of the union (every rank must call them together). ``max_tokens`` (every
    method): each term's batches merged into passes of at most that many tokens (:func:`~.nll.batch_nll_sums`;
    None: one forward per batch). :func:`objective_values` and :func:`objective_gradients` evaluate several
    objectives at once, data they share evaluated once."""

    def __init__(self, terms: list[LossTerm]):
        if not terms:
            raise ValueError("an objective needs at least one term")
        self.terms = terms

    def term_values(self, model, *, max_tokens: Optional[int] = None) -> dict[str, float]:
        """Each term's contribution to the objective (weight, sign and ceiling applied), by term name."""
        return objective_values(model, [self], max_tokens=max_tokens)[0]

    def gradient(self, model, params: Mapping[str, Tensor], *, max_tokens: Optional[int] = None
                 ) -> tuple[float, dict[str, Tensor]]:
        """The objective's value and its gradient w.r.t. ``params`` (zeros for unused ones), in curvature mode
        (:func:`objective_gradients`).

        Under ``torch.distributed`` each rank holds its own batches: NLL sums, token counts and gradients are
        all-reduced, so every rank gets the value and gradient of the union of the data.
        """
        return objective_gradients(model, params, [self], max_tokens=max_tokens)[0]

    def evaluate(self, model, *, max_tokens: Optional[int] = None) -> float:
        """The objective's value (weights, signs and ceilings applied), without gradients, in curvature mode."""
        return sum(self.term_values(model, max_tokens=max_tokens).values())

    def term_nlls(self, model, *, max_tokens: Optional[int] = None) -> dict[str, float]:
        """Each term's plain mean NLL (no weight, sign or ceiling), by term name."""
        nlls = _term_nlls(model, _distinct([self]), max_tokens)
        return {term.name: nlls[id(term.batches)] for term in self.terms}

    @property
    def batches(self) -> list:
        return [b for t in self.terms for b in t.batches]


def _distinct(objectives: Sequence[Objective]) -> list[LossTerm]:
    """One term per distinct data (list of batches, by identity) over ``objectives``, in order of first use: what a
    term computes besides its weight, sign and ceiling is its data's mean NLL."""
    seen: dict[int, LossTerm] = {}
    for objective in objectives:
        for term in objective.terms:
            seen.setdefault(id(term.batches), term)
    return list(seen.values())


def _contribution(term: LossTerm, nll: float) -> tuple[float, bool]:
    """The term's value at mean NLL ``nll`` (NaN stays NaN: a trial step's non-finite loss is rejected by its
    caller) and whether its gradient counts (not a raised NLL past its ceiling)."""
    if term.sign < 0 and term.ceiling is not None and nll > term.ceiling:
        return term.weight * term.sign * term.ceiling, False  # flat above the ceiling
    return term.weight * term.sign * nll, True


def _summed_over_ranks(values: list, device: torch.device) -> list[float]:
    """Scalars (device tensors or numbers) as floats summed over ranks: one read of the device, one collective."""
    return all_reduce_counts(torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device)
                                          for v in values]).tolist(), device)


def _term_nlls(model, terms: Sequence[LossTerm], max_tokens: Optional[int]) -> dict[int, float]:
    """Mean NLL of each term's data (by ``id(term.batches)``), in curvature mode without gradients; under
    ``torch.distributed`` over every rank's data, all sums and counts in one collective."""
    local = []
    with torch.no_grad(), curvature_mode(model):
        for term in terms:
            total, count = 0.0, 0
            for s, n in batch_nll_sums(model, term.batches, grad=False, max_tokens=max_tokens):
                total, count = total + s, count + n
            local += [total, count]
    values = _summed_over_ranks(local, next(model.parameters()).device)
    out = {}
    for term, total, count in zip(terms, values[0::2], values[1::2]):
        if count == 0:
            raise ValueError(f"no counted tokens in the {term.name} data")
        out[id(term.batches)] = total / count
    return out


def objective_values(model, objectives: Sequence[Objective], *, max_tokens: Optional[int] = None
                     ) -> list[dict[str, float]]:
    """Each objective's :meth:`Objective.term_values`, in curvature mode: the data that several objectives' terms
    share (the same list of batches, as restore's benign term and its benign constraint) evaluated once, every
    term's batches in passes of up to ``max_tokens`` tokens (None: a forward per batch)."""
    nlls = _term_nlls(model, _distinct(objectives), max_tokens)
    return [{term.name: _contribution(term, nlls[id(term.batches)])[0] for term in objective.terms}
            for objective in objectives]


def objective_gradients(model, params: Mapping[str, Tensor], objectives: Sequence[Objective], *,
                        max_tokens: Optional[int] = None) -> list[tuple[float, dict[str, Tensor]]]:
    """Each objective's value and gradient w.r.t. ``params`` (:meth:`Objective.gradient`), in curvature mode, the data
    that several objectives share evaluated and differentiated once (as :func:`objective_values`).

    Each pass (a batch, or with ``max_tokens`` consecutive batches merged) is differentiated as soon as its forward
    has run, so the activations of one pass are alive at a time, however many batches a term has (a training step's
    with a batch's worth of tokens per pass). The pass's NLL sum is divided by its term's counted tokens, known
    before the passes (summed over ranks first under ``torch.distributed``). A raised NLL past its ceiling adds the
    ceiling and no gradient (its passes are differentiated all the same: whether it is past is known at the end).
    Per distinct data one parameter-sized gradient is held until the objectives are summed, in place where the data
    has one user.
    """
    device = next(iter(params.values())).device if params else torch.device("cpu")
    terms = _distinct(objectives)
    counts = all_reduce_counts([float(t.tokens) for t in terms], device)
    sums, grads = [], {}
    with curvature_mode(model), forward_tensors(model, params) as used:
        for term, count in zip(terms, counts):
            acc = [whole_zeros(p) for p in params.values()]
            total = 0.0
            for s, _ in batch_nll_sums(model, term.batches, grad=True, max_tokens=max_tokens):
                tensors = list(used.values())  # FSDP2: the whole parameters this pass's forward used
                for g, part in zip(acc, torch.autograd.grad(s * (1.0 / count), tensors, allow_unused=True)):
                    if part is not None:
                        g.add_(part)
                total = total + s.detach()
            sums.append(total)
            grads[id(term.batches)] = acc
    all_reduce_sum_([g for acc in grads.values() for g in acc])
    nll_sums = _summed_over_ranks(sums, device)
    nlls = {id(t.batches): total / count for t, total, count in zip(terms, nll_sums, counts)}
    users = Counter(id(t.batches) for objective in objectives for t in objective.terms)
    out = []
    for objective in objectives:
        value, acc = 0.0, None
        for term in objective.terms:
            key = id(term.batches)
            if not math.isfinite(nlls[key]):
                raise FloatingPointError(f"the {term.name} loss is not finite ({nlls[key]})")
            part, differentiated = _contribution(term, nlls[key])
            value += part
            users[key] -= 1
            g = grads[key] if users[key] == 0 else None
            if users[key] == 0:
                del grads[key]
            if not differentiated:
                continue
            scale = term.weight * term.sign
            g = g if g is not None else [x.clone() for x in grads[key]]  # another objective still reads the data's
            if acc is None:
                acc = g if scale == 1.0 else [x.mul_(scale) for x in g]
            else:
                for x, y in zip(acc, g):
                    x.add_(y, alpha=scale)
        if acc is None:
            acc = [whole_zeros(p) for p in params.values()]
        out.append((value, dict(zip(params, acc))))
    return out


SAFETY_DATA_SHAPES = ("expected HF batches (mappings with input_ids [batch, seq], optional attention_mask, and labels "
                      "with -100 on the prompt; no labels: the whole row is the prompt) or a list of prompts "
                      "(strings, or chat turns as curvsafe.data reads them) with tokenizer=...")


def safety_batches(data, tokenizer=None, *, needs_responses: bool, batch_size: int = 16,
                   max_length: int = 128) -> list[dict[str, Tensor]]:
    """Safety data as users hold it -> HF batches with labels.

    - HF batches with ``labels`` (-100 on the prompt): as they are;
    - HF batches without ``labels`` (straight from a tokenizer): prompt only, every label -100;
    - a list of prompts with ``tokenizer``: strings, or conversations (:data:`curvsafe.data.Conversation`, as
      :func:`curvsafe.data.load_pairs` reads chat turns), rendered like training prompts (chat template or the
      plain template, :func:`curvsafe.data.render_prompt`), prompt only.

    ``needs_responses`` (the ``refusal`` and ``harmful`` objectives): prompt-only data is refused, since those
    objectives score given responses. Anything else is a one-line ``ValueError`` saying what is expected.
    """
    from .data import collate, prompt_text, render_prompt

    if isinstance(data, Mapping):
        raise ValueError(f"safety data is a single batch (a mapping): pass a list of batches; {SAFETY_DATA_SHAPES}")
    if isinstance(data, str) or not isinstance(data, Iterable):
        raise ValueError(f"safety data is a {type(data).__name__}: {SAFETY_DATA_SHAPES}")
    items = list(data)
    if not items:
        raise ValueError(f"safety data is empty: {SAFETY_DATA_SHAPES}")
    if all(isinstance(x, (str, tuple)) for x in items):
        if needs_responses:
            raise ValueError("the refusal and harmful objectives score given responses: pass HF batches whose labels "
                             "mark them (-100 on the prompt), not prompts")
        if tokenizer is None:
            raise ValueError("safety data is a list of prompts: pass tokenizer=... to tokenise them")
        if any(not prompt_text(x).strip() for x in items):
            raise ValueError("safety data: a prompt is empty")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        encoded = [tokenizer(render_prompt(tokenizer, x), add_special_tokens=False)["input_ids"][-max_length:]
                   for x in items]
        rows = [(ids, [IGNORE_INDEX] * len(ids)) for ids in encoded]
        return [collate(rows[i:i + batch_size], pad) for i in range(0, len(rows), batch_size)]
    out = []
    for i, b in enumerate(items):
        if not isinstance(b, Mapping) or "input_ids" not in b:
            raise ValueError(f"safety data item {i} is a {type(b).__name__}: {SAFETY_DATA_SHAPES}")
        try:
            batch = prepare_batch(b)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ValueError(f"safety batch {i}: {exc}") from None
        if "labels" not in b:
            batch["labels"] = torch.full_like(batch["input_ids"], IGNORE_INDEX)
            if needs_responses:
                raise ValueError(f"safety batch {i} has no labels: the refusal and harmful objectives score given "
                                 "responses; mark them in labels (-100 on the prompt)")
        out.append(batch)
    return out


def safety_objective(weights: Mapping[str, float], *, anchor: Callable[[], list], responses: Callable[[], list],
                     prefix_tokens: Optional[int], ceiling: Callable[[list], Optional[float]] = lambda batches: None,
                     benign: Optional[Callable[[], list]] = None) -> Objective:
    """The safety objective of parsed ``weights`` from its data: the one place where its terms are made (restore
    through :func:`build_safety`, :class:`~curvsafe.optim.CurvSafe` from batches).

    Each source is called only when a term needs it: ``anchor`` gives the anchor batches (the aligned model's own
    responses to the harmful prompts), ``benign`` its responses to benign prompts, ``responses`` the harmful data
    with given responses (refusal texts for ``refusal``, harmful answers for ``harmful``). ``ceiling`` gives the
    NLL at which the ``harmful`` term goes flat (the aligned model's on the same batches; None: no floor). The
    ``anchor``, ``benign`` and ``refusal`` terms count the first ``prefix_tokens`` response tokens of each row:
    greedy decoding commits to refusing or complying there (measured on the testbed: the full-response NLL fell
    to within 0.11 nats of the aligned model while 99.7% of answers stayed harmful; its easy tokens dominate).
    """
    terms = []
    for name, w in weights.items():
        if name == "anchor":
            terms.append(LossTerm("anchor", keep_response_prefix(anchor(), prefix_tokens), w))
        elif name == "benign":
            if benign is None:
                raise ValueError("the benign objective needs the aligned model's responses to benign prompts "
                                 "(benign_anchor)")
            terms.append(LossTerm("benign", keep_response_prefix(benign(), prefix_tokens), w))
        elif name == "refusal":
            terms.append(LossTerm("refusal", keep_response_prefix(responses(), prefix_tokens), w))
        else:
            batches = responses()
            terms.append(LossTerm("harmful", batches, w, sign=-1.0, ceiling=ceiling(batches)))
    return Objective(terms)


def build_safety(model, tokenizer, pairs: Sequence[Pair], objective: Union[str, Mapping[str, float]], *,
                 batch_size: int = 16, max_length: int = 128, anchor: Optional[Sequence[Pair]] = None,
                 aligned_nll: Optional[Callable[[list], float]] = None,
                 prefix_tokens: Optional[int] = 4,
                 benign_anchor: Optional[Sequence[Pair]] = None,
                 shard: Optional[Callable[[list, str], list]] = None) -> tuple[Objective, dict]:
    """The safety objective S from harmful prompts (and responses) for ``objective`` (see
    :func:`safety_objective`); also returns the data used (``anchor`` / ``benign`` pairs) for the report.
    ``anchor`` reuses previously generated anchor responses; ``benign_anchor`` (the aligned model's responses to
    benign prompts) is needed by the ``benign`` term; ``aligned_nll`` gives the ``harmful`` term's floor.
    ``shard(batches, what)``: this process's part of each term's batches (a data-parallel run's
    :func:`curvsafe.ranks.shard`; the batches are made from all the pairs first, so every rank's are the same
    as a single process's)."""
    used = {}

    def batches(chosen: Sequence[Pair]) -> list:
        made = make_batches(tokenizer, chosen, batch_size=batch_size, max_length=max_length)
        return made if shard is None else shard(made, "batches of safety data")

    def anchor_data() -> list:
        chosen = list(anchor) if anchor is not None else anchor_responses(model, tokenizer, [p.prompt for p in pairs])
        if not chosen:
            raise ValueError("the aligned model produced no response to any harmful prompt")
        used["anchor"] = chosen
        return batches(chosen)

    def benign_data() -> list:
        if not benign_anchor:
            raise ValueError("the aligned model produced no response to any benign prompt")
        used["benign"] = list(benign_anchor)
        return batches(used["benign"])

    safety = safety_objective(parse_objective(objective), anchor=anchor_data, responses=lambda: batches(pairs),
                              prefix_tokens=prefix_tokens, benign=None if benign_anchor is None else benign_data,
                              ceiling=aligned_nll if aligned_nll is not None else lambda b: None)
    return safety, used
