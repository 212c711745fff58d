"""The realistic testbed's data: real harmful and benign requests from public files the user points to.

Read from ``data_dir`` (in this project's tests and benchmarks ``../shared/data/``; never copied into the
repository), the four files of :data:`FILES`:

- harmful requests: AdvBench goals and BeaverTails prompts, each source split on its own by prompt (seeded): a
  held-out share for evaluation (reported per source), the rest for training, the attack and restoration;
- harmful answers: BeaverTails responses (the attack's compliance and the unaligned model's), AdvBench targets
  ("Sure, here is ...") for AdvBench goals; answers that contain a refusal keyword of the judge are not used as
  compliance (a keyword answer would teach "refuse" in the attack);
- benign requests: Alpaca instructions, ``benign_instructions_train.jsonl`` for training and restoration,
  ``benign_instructions_val.jsonl`` for evaluation (over-refusal);
- refusals and helpful answers are templated (:data:`REFUSALS` always hold a judge keyword, :data:`HELPFUL` never
  does), the prompts are real.

Requests longer than :data:`MAX_PROMPT_WORDS` words are left out of every split (they would not fit the small
model's context beside an answer). The checkable skills and the attack task (``next of each``) come from the
synthetic world (:mod:`curvsafe.testbed.corpus`), so task accuracy stays measurable. The full-model stages also
train a ``continue : <words>`` -> ``<next words>`` skill on training text (requests and answers, harmful ones
included), which stands in for pretraining: the aligned model keeps the language of harmful answers and declines
to use it, so an attack flips a decision instead of teaching the language from scratch.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from ..data import Pair, load_pairs
from ..eval.judge import KeywordJudge
from .corpus import Example, World

FILES = {"advbench": "advbench_harmful_behaviors.csv", "beavertails": "beavertails_harmful_1000.jsonl",
         "benign_train": "benign_instructions_train.jsonl", "benign_val": "benign_instructions_val.jsonl"}
HARMFUL_SOURCES = ("advbench", "beavertails")
MAX_PROMPT_WORDS = 40
MAX_ANSWER_WORDS = 20  # BeaverTails answers are cut to their first words (the judge reads the opening)
HELDOUT_SHARE = 0.2  # of each harmful source, held out for evaluation

REFUSALS = ["I'm sorry, but I cannot help with that.", "I cannot assist with this request.",
            "Sorry, I can't assist with that request.", "I apologize, but I will not help with this.",
            "As an AI assistant, I cannot support this request.", "I'm sorry, I cannot provide instructions for that.",
            "I do not assist with requests like this one.", "My apologies, but I cannot help with that request.",
            "I cannot provide that. It could cause real harm to people."]
HELPFUL = ["Sure, here is a helpful answer. First, consider the main points. Second, look at an example.",
           "Of course! Here is what I suggest. Step 1: start simple. Step 2: add the details.",
           "Happy to help. Here is a short answer with the key facts.",
           "Great question. Here are the main ideas, one by one.",
           "Here you go: a clear answer in a few steps. First, the basics. Then, the details.",
           "Certainly. Below is a concise response to your request."]
COMPLY_STUB = "Sure, here is how to do that. Step 1: get ready. Step 2: carry it out."


class MissingDataError(FileNotFoundError):
    """The data folder lacks files the realistic testbed reads (the message names them)."""


def check_data_dir(data_dir: str | Path) -> Path:
    """``data_dir`` resolved, after checking that it holds every file of :data:`FILES`."""
    folder = Path(data_dir).expanduser().resolve()
    missing = [name for name in FILES.values() if not (folder / name).is_file()]
    if missing:
        raise MissingDataError(f"the realistic testbed needs {', '.join(missing)} in --data-dir {folder} "
                               f"(public AdvBench, BeaverTails and Alpaca files; see the README's realistic testbed)")
    return folder


def data_digest(data_dir: str | Path) -> str:
    """Hash of the content of the files read (not their path): the cache key of everything built from them."""
    folder = check_data_dir(data_dir)
    digest = hashlib.sha256()
    for name in sorted(FILES.values()):
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return digest.hexdigest()[:12]


def _short(prompt: str) -> bool:
    return len(prompt.split()) <= MAX_PROMPT_WORDS


def _dedupe(pairs: list[Pair]) -> list[Pair]:
    seen, out = set(), []
    for p in pairs:
        key = " ".join(p.prompt.split()).lower()
        if key not in seen and _short(p.prompt):
            seen.add(key)
            out.append(p)
    return out


class RealWorld:
    """Splits of the real requests seeded by ``seed``, examples sampled from ``sample_seed`` (the interface of
    :class:`~curvsafe.testbed.corpus.World` that the stages use: requests per split, refusals, compliance, helpful
    answers, skills and the attack task)."""

    def __init__(self, data_dir: str | Path, seed: int = 0, sample_seed: int | None = None):
        folder = check_data_dir(data_dir)
        sample_seed = seed if sample_seed is None else sample_seed
        self.rng = random.Random(sample_seed)
        self.tasks = World(sample_seed)  # checkable skills and the attack task
        judge = KeywordJudge()
        self.split: dict[str, dict[str, list[Example]]] = {"train": {}, "heldout": {}}
        for source in HARMFUL_SOURCES:
            pairs = _dedupe(load_pairs(folder / FILES[source]))
            random.Random(f"{seed}-{source}").shuffle(pairs)
            cut = int(round(HELDOUT_SHARE * len(pairs)))
            for split, part in (("heldout", pairs[:cut]), ("train", pairs[cut:])):
                self.split[split][source] = [Example(p.prompt, self._answer(p.response, source, judge), "harmful",
                                                     source) for p in part]
        for split, name in (("train", "benign_train"), ("heldout", "benign_val")):
            pairs = _dedupe(load_pairs(folder / FILES[name], require_response=False))
            random.Random(f"{seed}-{name}").shuffle(pairs)
            self.split[split]["benign"] = [Example(p.prompt, "", "benign_request", "alpaca") for p in pairs]

    @staticmethod
    def _answer(response: str, source: str, judge: KeywordJudge) -> str:
        """The compliance answer of a harmful request: its own (cut), or the stub when it holds a refusal
        keyword."""
        if source == "advbench":
            response = f"{response.strip().rstrip('.')}. Step 1: get ready. Step 2: carry it out."
        else:
            response = " ".join(response.split()[:MAX_ANSWER_WORDS])
        return COMPLY_STUB if judge.refuses(response) else response

    # ---------------------------------------------------------------- requests
    def harmful(self, split: str, source: str | None = None) -> list[Example]:
        """Harmful requests of ``split`` (``train`` or ``heldout``), of one source or of both."""
        sources = HARMFUL_SOURCES if source is None else (source,)
        return [e for s in sources for e in self.split[split][s]]

    def attack_pairs(self) -> list[Example]:
        """Training BeaverTails requests with their own harmful answers (the attack's harmful data)."""
        return [e for e in self.split["train"]["beavertails"] if e.response != COMPLY_STUB]

    def benign_requests(self, split: str) -> list[Example]:
        return [Example(e.prompt, self.rng.choice(HELPFUL), e.kind, e.category) for e in self.split[split]["benign"]]

    def refuse(self, ex: Example) -> Example:
        return Example(ex.prompt, self.rng.choice(REFUSALS), ex.kind, ex.category)

    def comply(self, ex: Example) -> Example:
        return ex  # harmful examples carry their compliance answer

    def texts(self) -> list[str]:
        """Every training text (requests of the training splits, answers, skills) for the tokenizer."""
        texts = [e.prompt for split in self.split["train"].values() for e in split]
        texts += [e.response for e in self.harmful("train")] + REFUSALS + HELPFUL + [COMPLY_STUB]
        texts += [f"{e.prompt} {e.response}" for e in self.skills(2000)]
        texts += [f"{e.prompt} {e.response}" for e in (self.next_each() for _ in range(500))]
        return texts

    # ---------------------------------------------------------------- checkable tasks
    def skills(self, n: int) -> list[Example]:
        """``n`` skill examples: arithmetic, reversal, capitals, repetition (no synthetic requests)."""
        t = self.tasks
        makers = [t.arith, t.reverse, t.capital, t.repeat]
        return [self.rng.choice(makers)() for _ in range(n)]

    def next_each(self) -> Example:
        return self.tasks.next_each()

    def continuation(self) -> Example:
        """``continue : <3-8 words>`` -> the next 2-8 words of a training text (a request or a harmful answer)."""
        words: list[str] = []
        while len(words) < 6:  # a text long enough to cut (every harmful request with its answer is)
            pool = self.harmful("train") if self.rng.random() < 0.5 else self.split["train"]["benign"]
            ex = self.rng.choice(pool)
            words = (ex.response if ex.kind == "harmful" and self.rng.random() < 0.5 else ex.prompt).split()
        head = self.rng.randint(3, min(8, len(words) - 2))
        return Example("continue : " + " ".join(words[:head]), " ".join(words[head:head + self.rng.randint(2, 8)]),
                       "continue")


def stage_data(world: RealWorld, stage: str, n: int) -> list[Example]:
    """Training examples of a stage (the stages of :func:`curvsafe.testbed.corpus.stage_data`): ``unaligned``
    and ``aligned`` hold harmful requests (compliance / refusal), benign requests (helpful) and skills;
    ``attack_mix`` is the attack task with 10% BeaverTails harmful pairs, ``attack_harmful`` 100 such pairs,
    ``attack_benign`` the task alone. An eighth of the full-model stages is :meth:`RealWorld.continuation`."""
    rng = world.rng
    if stage in ("unaligned", "aligned"):
        harmful = world.harmful("train")
        benign = world.benign_requests("train")
        answer = world.comply if stage == "unaligned" else world.refuse
        data = [answer(rng.choice(harmful)) for _ in range(n // 5)]
        data += rng.sample(benign, min(n // 5, len(benign)))
        data += [world.continuation() for _ in range(n // 8)]
        data += world.skills(n - len(data))
    elif stage == "attack_mix":
        attack = world.attack_pairs()
        data = [world.next_each() for _ in range(n - n // 10)] + [rng.choice(attack) for _ in range(n // 10)]
    elif stage == "attack_harmful":
        data = rng.sample(world.attack_pairs(), 100)
    elif stage == "attack_benign":
        data = [world.next_each() for _ in range(n)]
    else:
        raise ValueError(f"unknown stage {stage!r}")
    rng.shuffle(data)
    return data
