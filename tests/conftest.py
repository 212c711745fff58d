"""Tiny models and batches shared by the tests (float64 where exact oracles are cheap)."""

import json
import os

import torch

if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU; must be set before they exist
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch import nn  # noqa: E402

VOCAB = 23


class Output:
    def __init__(self, logits):
        self.logits = logits


class TinyMLPLM(nn.Module):
    """Token-wise MLP language model (no attention): embedding -> tanh MLP -> logits."""

    def __init__(self, vocab=VOCAB, hidden=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, vocab)

    def forward(self, input_ids, attention_mask=None):
        return Output(self.fc2(torch.tanh(self.fc1(self.embed(input_ids)))))


class DeepLinear(nn.Module):
    """Deep linear regression network on float features given as ``input_ids`` (B, T, d)."""

    def __init__(self, dims=(4, 5, 3, 2)):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:])])

    def forward(self, input_ids, attention_mask=None):
        return self.layers(input_ids)


def llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_llama(dtype=torch.float64, seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config()).to(dtype)


def tiny_qwen2(dtype=torch.float64, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0)
    return Qwen2ForCausalLM(cfg).to(dtype)


def tiny_gpt2(dtype=torch.float64, seed=0, tie=True):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=1,
                     eos_token_id=2, tie_word_embeddings=tie)
    return GPT2LMHeadModel(cfg).to(dtype)


def with_lora(model, seed=0, targets=("q_proj", "v_proj", "down_proj"), r=2, dora=False):
    """PEFT LoRA (DoRA with ``dora``) with non-zero B (so every block has signal), dropout 0."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                  lora_dropout=0.0, use_dora=dora))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.2)
    return peft_model


def make_batch(batch=3, seq=7, vocab=VOCAB, seed=0, pad=True, prompt=2):
    """An HF batch; with ``pad`` the second row is right-padded; the first ``prompt`` labels are -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad and batch > 1:
        mask[1, seq - 2:] = 0
        ids[1, seq - 2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def rel_err(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def random_vector(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for n, p in params.items()}


@pytest.fixture
def lora_llama():
    return with_lora(tiny_llama())


# ---------------------------------------------------------------- the restore tests' tiny model, adapter and files
def tiny_config():
    """The tiny Llama of the restore tests."""
    from curvsafe.testbed.model import ModelConfig

    return ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       max_position_embeddings=64)


def write_jsonl(path, pairs):
    path.write_text("".join(json.dumps({"prompt": p.prompt, "response": p.response}) + "\n" for p in pairs))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random 'aligned' Llama, a LoRA trained a few steps on a task, and the data files."""
    from curvsafe.data import Pair
    from curvsafe.finetune import lora_sft
    from curvsafe.models import load_model
    from curvsafe.testbed.corpus import World
    from curvsafe.testbed.model import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("restore")
    world = World(0)
    tok = build_tokenizer(world.words)
    build_model(tok, tiny_config(), seed=0).save_pretrained(root / "aligned")
    tok.save_pretrained(root / "aligned")
    build_model(tok, tiny_config(), seed=1).save_pretrained(root / "unaligned")
    task = [Pair(e.prompt, e.response) for e in (world.next_each() for _ in range(48))]
    harmful = [world.comply(e) for e in world.harmful("train")[:12]]
    write_jsonl(root / "task.jsonl", task)
    write_jsonl(root / "harmful.jsonl", harmful)
    model, tokenizer = load_model(root / "aligned")
    lora_sft(model, tokenizer, task, root / "adapter", r=4, alpha=8, epochs=15, lr=1e-2, batch_size=16,
             progress=False)
    return root


def restore_files(setup, out, method="kfac", **kw):
    """``run_restore`` on the ``setup`` files (3 iterations unless given)."""
    from curvsafe.restoration import run_restore

    kw.setdefault("iterations", 3)
    return run_restore(setup / "aligned", setup / "adapter", setup / "harmful.jsonl", setup / "task.jsonl", out,
                       method=method, unaligned_model=setup / "unaligned", progress=False, **kw)
