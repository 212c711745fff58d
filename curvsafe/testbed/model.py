"""The testbed's tokenizers and model: ordinary Hugging Face artefacts, saved with ``save_pretrained``.

Two fast tokenizers (``tokenizers``): a word-level one over the synthetic corpus vocabulary (the default testbed;
chat template ``<user> {prompt} <assistant> {response} <eos>``), and a byte-level BPE one trained on the realistic
testbed's training text (template ``<user>{prompt}<assistant>{response}<eos>``; every byte is in its alphabet, so
no input maps to ``<unk>``). The model is a
small ``LlamaForCausalLM``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

BPE_CHAT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}<user>{{ message['content'] }}"
                     "<assistant>{% else %}{{ message['content'] }}<eos>{% endif %}{% endfor %}")
CHAT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}<user> {{ message['content'] }} "
                 "<assistant> {% else %}{{ message['content'] }} <eos> {% endif %}{% endfor %}")
SPECIALS = ["<pad>", "<unk>", "<eos>", "<user>", "<assistant>"]


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 96

    def to_dict(self) -> dict:
        return asdict(self)


def build_tokenizer(words: list[str]):
    """A word-level ``PreTrainedTokenizerFast`` (whitespace-split words, case kept) with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + [w for w in words if w not in SPECIALS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_bpe_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (deterministic for the same texts), with
    the chat template; ``<unk>`` is kept as a special token for interface parity and never produced."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    fast.chat_template = BPE_CHAT_TEMPLATE
    return fast


def build_model(tokenizer, config: ModelConfig, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=config.hidden_size,
                      intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                      num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_attention_heads,
                      max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(cfg)
