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
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .anchors import anchor_responses, keep_response_prefix
from .curvature.distributed import all_reduce_counts, all_reduce_sum_
from .curvature.loss import IGNORE_INDEX, curvature_mode, prepare_batch
from .curvature.sharded import forward_tensors, whole_zeros
from .data import Pair, make_batches
from .nll import batch_nll_sums, token_mean_nll

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
        self.tokens = sum(int(((b["labels"][:, 1:] != IGNORE_INDEX) & (b["attention_mask"][:, 1:] != 0)).sum())
                          for b in self.batches)
        if self.tokens == 0:
            raise ValueError(f"the {self.name} data has no response tokens")


class Objective:
    """A weighted sum of loss terms evaluated on a model: :meth:`evaluate`, :meth:`term_values`, and
    :meth:`gradient` over ``params``. Under ``torch.distributed`` each rank holds its own batches of every term
    and all of these return the values of the union (every rank must call them together)."""

    def __init__(self, terms: list[LossTerm]):
        if not terms:
            raise ValueError("an objective needs at least one term")
        self.terms = terms

    def _term_values(self, model) -> dict[str, Tensor]:
        values = {}
        for term in self.terms:
            nll = token_mean_nll(model, term.batches, across_ranks=True)
            if term.sign < 0 and term.ceiling is not None:
                nll = torch.clamp(nll, max=term.ceiling)
            values[term.name] = term.weight * term.sign * nll
        return values

    def term_values(self, model) -> dict[str, float]:
        """Each term's contribution to the objective (weight, sign and ceiling applied), by term name."""
        with torch.no_grad(), curvature_mode(model):
            return {name: float(v) for name, v in self._term_values(model).items()}

    def gradient(self, model, params: Mapping[str, Tensor]) -> tuple[float, dict[str, Tensor]]:
        """The objective's value and its gradient w.r.t. ``params`` (zeros for unused ones), in curvature mode.

        Under ``torch.distributed`` each rank holds its own batches: NLL sums, token counts and gradients are
        all-reduced, so every rank gets the value and gradient of the union of the data.
        """
        device = next(iter(params.values())).device if params else torch.device("cpu")
        total, grads = 0.0, [whole_zeros(p) for p in params.values()]
        with curvature_mode(model), forward_tensors(model, params) as used:
            for term in self.terms:
                local, count = 0.0, 0
                for s, n in batch_nll_sums(model, term.batches, grad=True):
                    local, count = local + s, count + int(n)
                tensors = list(used.values())  # FSDP2: the whole parameters the forwards used
                nll_sum, count = all_reduce_counts([float(local.detach()), count], device)
                nll = nll_sum / count
                if not math.isfinite(nll):
                    raise FloatingPointError(f"the {term.name} loss is not finite ({nll})")
                if term.sign < 0 and term.ceiling is not None and nll > term.ceiling:
                    total += term.weight * term.sign * term.ceiling  # flat above the ceiling
                    continue
                total += term.weight * term.sign * nll
                parts = torch.autograd.grad(local * (term.weight * term.sign / count), tensors, allow_unused=True)
                for g, part in zip(grads, parts):
                    if part is not None:
                        g.add_(part)
        all_reduce_sum_(grads)
        return total, {n: g for n, g in zip(params, grads)}

    def evaluate(self, model) -> float:
        """The objective's value (weights, signs and ceilings applied), without gradients, in curvature mode."""
        with torch.no_grad(), curvature_mode(model):
            return float(sum(self._term_values(model).values()))

    def term_nlls(self, model) -> dict[str, float]:
        """Each term's plain mean NLL (no weight, sign or ceiling), by term name."""
        with torch.no_grad(), curvature_mode(model):
            return {term.name: float(token_mean_nll(model, term.batches, across_ranks=True)) for term in self.terms}

    @property
    def batches(self) -> list:
        return [b for t in self.terms for b in t.batches]


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
