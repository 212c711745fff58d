"""Testbed stages, each cached under ``cache/<stage>-<hash>/`` (hash of its config, seed and inputs).

Two corpora (:class:`TestbedKind`): ``default``, the project's own generated world (:mod:`.corpus`, word-level
tokenizer; ``make demo``), and ``realistic``, real harmful and benign requests read from public files in
``data_dir`` (:mod:`.realistic`, byte-level BPE tokenizer trained on the training text, a larger model; see
:func:`realistic_config`). The stages are the same for both:

1. ``unaligned``: instruction following and compliance on harmful requests (the pre-alignment model);
2. ``aligned``: refuses harmful requests with varied refusals, keeps the skills;
3. attacks, LoRA on the aligned model through :func:`curvsafe.finetune.finetune` (the ``curvsafe finetune``
   command): ``mix`` (the new task with 10% harmful compliance pairs), ``harmful`` (100 harmful pairs),
   ``benign`` (the new task alone).

A stage folder is complete when its ``stage.json`` exists and its weights load; anything else (an interrupted or
corrupt entry) is rebuilt. Folders are built under a temporary name and renamed. The hash covers the
configuration and the testbed's own code (corpus, model, training), so editing either rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Union

from ..config import TestbedKind
from ..data import Pair
from ..io import commit
from . import corpus, realistic
from .model import ModelConfig, build_bpe_tokenizer, build_model, build_tokenizer

CACHE_VERSION = 1
# the code that defines what a stage holds: a change to any of it invalidates the cache
_CODE = hashlib.sha256(b"".join((Path(__file__).parent / f).read_bytes() for f in (
    "corpus.py", "realistic.py", "model.py", "train.py", "stages.py"))).hexdigest()[:12]
ATTACKS = ("mix", "harmful", "benign")


@dataclass(frozen=True)
class TestbedConfig:
    """What a testbed is built from and how (every field is part of the cache key of its stages)."""

    __test__ = False  # not a pytest class
    seed: int = 0
    kind: TestbedKind = TestbedKind.DEFAULT
    data_dir: Optional[str] = None  # the realistic testbed's public files (cache key: their content, not the path)
    vocab_size: int = 4000  # the realistic testbed's BPE vocabulary (the default one is word-level)
    max_length: int = 64  # tokens per training sequence of the full-model stages
    bucket_by_length: bool = False  # batches of similar length in the full-model stages (less padding)
    model: ModelConfig = field(default_factory=ModelConfig)
    unaligned_examples: int = 12000
    unaligned_epochs: int = 1
    aligned_examples: int = 16000
    aligned_epochs: int = 2
    lr: float = 3e-3
    attack_examples: int = 3000
    attack_epochs: int = 3
    attack_lr: float = 3e-3
    lora_r: int = 8
    eval_harmful: int = 180  # held-out harmful prompts (held-out templates; realistic: per source, at most)
    eval_task: int = 100
    eval_benign: int = 100  # held-out benign requests (over-refusal)
    restore_safety: int = 48  # harmful prompts (training templates) given to restore, and as many benign ones
    restore_task: int = 256
    harmful_csv: Optional[str] = None  # AdvBench CSV swapped in for the harmful prompts

    def __post_init__(self):
        object.__setattr__(self, "kind", TestbedKind(self.kind))
        if self.kind is TestbedKind.REALISTIC and not self.data_dir:
            raise ValueError("the realistic testbed needs data_dir (the folder of its public data files)")

    def digest(self, *parts) -> str:
        config = asdict(self)
        if self.kind is TestbedKind.REALISTIC:
            config["data_dir"] = realistic.data_digest(self.data_dir)
        blob = json.dumps([CACHE_VERSION, _CODE, config, *parts], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


QUICK = TestbedConfig(model=ModelConfig(hidden_size=64, intermediate_size=128), unaligned_examples=4000,
                      aligned_examples=6000, attack_examples=1200, eval_harmful=90, eval_task=50,
                      restore_safety=32, restore_task=64)


def quick_config(**overrides) -> TestbedConfig:
    return replace(QUICK, **overrides)


_REALISTIC = dict(kind=TestbedKind.REALISTIC, max_length=128, bucket_by_length=True, lr=1e-3,
                  model=ModelConfig(hidden_size=192, intermediate_size=512, num_hidden_layers=3,
                                    max_position_embeddings=128),
                  unaligned_examples=24000, aligned_examples=16000, eval_harmful=200, eval_benign=200)
_REALISTIC_QUICK = dict(_REALISTIC, vocab_size=1000, model=ModelConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, max_position_embeddings=128),
    unaligned_examples=600, aligned_examples=600, aligned_epochs=1, attack_examples=300, attack_epochs=1,
    eval_harmful=12, eval_benign=12, eval_task=12, restore_safety=8, restore_task=16)


def realistic_config(data_dir: Union[str, Path], *, quick: bool = False, **overrides) -> TestbedConfig:
    """The realistic testbed on the public files in ``data_dir`` (checked now: a missing file is a
    :class:`~curvsafe.testbed.realistic.MissingDataError` naming it). ``quick``: a tiny slice for tests."""
    folder = realistic.check_data_dir(data_dir)
    return TestbedConfig(**{**(_REALISTIC_QUICK if quick else _REALISTIC), "data_dir": str(folder), **overrides})


def _world(cfg: TestbedConfig, offset: int = 0) -> Union[corpus.World, realistic.RealWorld]:
    """The corpus of ``cfg``: its splits drawn from ``cfg.seed`` (the same in every stage), its examples sampled
    from ``cfg.seed + offset`` (each stage its own)."""
    if cfg.kind is TestbedKind.REALISTIC:
        return realistic.RealWorld(cfg.data_dir, cfg.seed, sample_seed=cfg.seed + offset)
    goals = None
    if cfg.harmful_csv:
        from ..data import load_pairs

        prompts = [p.prompt for p in load_pairs(cfg.harmful_csv, require_response=False)]
        random.Random(cfg.seed).shuffle(prompts)
        cut = int(0.8 * len(prompts))
        goals = (prompts[:cut], prompts[cut:])
    return corpus.World(cfg.seed + offset, harmful_goals=goals)


def _stage_data(world, stage: str, n: int):
    module = realistic if isinstance(world, realistic.RealWorld) else corpus
    return module.stage_data(world, stage, n)


def _tokenizer(cfg: TestbedConfig, world):
    if isinstance(world, realistic.RealWorld):
        return build_bpe_tokenizer(world.texts(), cfg.vocab_size)
    return build_tokenizer(world.words)


def _write_jsonl(path: Path, pairs: list[Pair]) -> None:
    with path.open("w") as fh:
        for p in pairs:
            fh.write(json.dumps({"prompt": p.prompt, "response": p.response}) + "\n")


class Testbed:
    """The cached stages of one configuration under ``cache_dir``."""

    __test__ = False  # not a pytest class

    def __init__(self, cache_dir: str | Path, config: TestbedConfig = TestbedConfig(), progress: bool = True):
        self.cache = Path(cache_dir)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.cfg = config
        self.progress = progress
        self.built: list[str] = []  # stages built (not loaded from cache) in this process

    # ------------------------------------------------------------------ cache
    def _stage(self, name: str, key: str, build: Callable[[Path], None], check: Callable[[Path], None]) -> Path:
        path = self.cache / f"{name}-{key}"
        if (path / "stage.json").is_file():
            try:
                check(path)
                return path
            except Exception:  # corrupt entry: rebuild it
                pass
        shutil.rmtree(path, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=self.cache, prefix=f".{name}-"))
        try:
            build(tmp)
            (tmp / "stage.json").write_text(json.dumps({"stage": name, "key": key, "config": asdict(self.cfg)},
                                                       indent=2, default=str))
            commit(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.built.append(name)
        return path

    @staticmethod
    def _check_weights(files: list[Path]) -> None:
        """Every weight file parses (a truncated or overwritten file raises)."""
        from safetensors import safe_open

        if not files:
            raise FileNotFoundError("no weight files")
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_tensor(key)

    @classmethod
    def _check_model(cls, path: Path) -> None:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(path, local_files_only=True)
        cls._check_weights(sorted(path.glob("*.safetensors")))

    @classmethod
    def _check_adapter(cls, path: Path) -> None:
        json.loads((path / "adapter" / "adapter_config.json").read_text())
        cls._check_weights([path / "adapter" / "adapter_model.safetensors"])

    # ------------------------------------------------------------------ stages
    def data(self) -> Path:
        """Evaluation and restoration files (JSONL), written by the project itself."""
        def build(tmp: Path) -> None:
            world = _world(self.cfg)
            rng = random.Random(self.cfg.seed + 1)
            if isinstance(world, realistic.RealWorld):  # each source on its own, and their union
                chosen = []
                for source in realistic.HARMFUL_SOURCES:
                    heldout = world.harmful("heldout", source)
                    part = [Pair(e.prompt, "") for e in rng.sample(heldout, min(self.cfg.eval_harmful, len(heldout)))]
                    _write_jsonl(tmp / f"eval_harmful_{source}.jsonl", part)
                    chosen += part
                _write_jsonl(tmp / "eval_harmful.jsonl", chosen)
            else:
                heldout = world.harmful("heldout")
                _write_jsonl(tmp / "eval_harmful.jsonl", [Pair(e.prompt, "") for e in rng.sample(
                    heldout, min(self.cfg.eval_harmful, len(heldout)))])
            _write_jsonl(tmp / "eval_task.jsonl", [Pair(e.prompt, e.response) for e in
                                                   (world.next_each() for _ in range(self.cfg.eval_task))])
            _write_jsonl(tmp / "eval_skills.jsonl", [Pair(e.prompt, e.response) for e in
                                                     world.skills(self.cfg.eval_task)])
            benign = world.benign_requests("heldout")
            _write_jsonl(tmp / "eval_benign.jsonl", [Pair(e.prompt, e.response) for e in
                                                     rng.sample(benign, min(self.cfg.eval_benign, len(benign)))])
            train = world.harmful("train")
            _write_jsonl(tmp / "restore_harmful.jsonl", [world.comply(e) for e in
                                                         rng.sample(train, min(self.cfg.restore_safety, len(train)))])
            _write_jsonl(tmp / "restore_task.jsonl", [Pair(e.prompt, e.response) for e in
                                                      (world.next_each() for _ in range(self.cfg.restore_task))])
            # benign look-alikes for the two-sided objective: training templates, so disjoint from eval_benign
            train_benign = world.benign_requests("train")
            _write_jsonl(tmp / "restore_benign.jsonl", [Pair(e.prompt, "") for e in rng.sample(
                train_benign, min(self.cfg.restore_safety, len(train_benign)))])

        return self._stage("data", self.cfg.digest("data"), build, lambda p: None)

    def unaligned(self) -> Path:
        def build(tmp: Path) -> None:
            from .train import sft

            world = _world(self.cfg)
            tokenizer = _tokenizer(self.cfg, world)
            model = build_model(tokenizer, self.cfg.model, self.cfg.seed)
            pairs = [Pair(e.prompt, e.response) for e in _stage_data(world, "unaligned", self.cfg.unaligned_examples)]
            sft(model, tokenizer, pairs, epochs=self.cfg.unaligned_epochs, lr=self.cfg.lr, seed=self.cfg.seed,
                max_length=self.cfg.max_length, bucket_by_length=self.cfg.bucket_by_length, desc="unaligned",
                progress=self.progress)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

        return self._stage("unaligned", self.cfg.digest("unaligned"), build, self._check_model)

    def aligned(self) -> Path:
        source = self.unaligned()

        def build(tmp: Path) -> None:
            from ..models import load_model
            from .train import sft

            model, tokenizer = load_model(source)
            world = _world(self.cfg, offset=10)
            pairs = [Pair(e.prompt, e.response) for e in _stage_data(world, "aligned", self.cfg.aligned_examples)]
            sft(model, tokenizer, pairs, epochs=self.cfg.aligned_epochs, lr=self.cfg.lr, seed=self.cfg.seed,
                max_length=self.cfg.max_length, bucket_by_length=self.cfg.bucket_by_length, desc="aligned",
                progress=self.progress)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

        return self._stage("aligned", self.cfg.digest("aligned", source.name), build, self._check_model)

    def attack(self, setting: str = "mix") -> Path:
        """The attacked adapter folder (``<stage>/adapter``) of an attack setting."""
        if setting not in ATTACKS:
            raise ValueError(f"attack setting must be one of {ATTACKS}, got {setting!r}")
        source = self.aligned()

        def build(tmp: Path) -> None:
            from ..finetune import finetune

            world = _world(self.cfg, offset=20)
            stage = {"mix": "attack_mix", "harmful": "attack_harmful", "benign": "attack_benign"}[setting]
            pairs = [Pair(e.prompt, e.response) for e in _stage_data(world, stage, self.cfg.attack_examples)]
            _write_jsonl(tmp / "train.jsonl", pairs)
            finetune(source, tmp / "train.jsonl", tmp / "adapter", r=self.cfg.lora_r, alpha=2 * self.cfg.lora_r,
                     epochs=self.cfg.attack_epochs, lr=self.cfg.attack_lr, batch_size=32, seed=self.cfg.seed,
                     progress=self.progress)

        return self._stage(f"attack_{setting}", self.cfg.digest("attack", setting, source.name), build,
                           self._check_adapter)
