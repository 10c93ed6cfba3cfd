"""Tiny random models and a byte-level tokenizer, built in-process for tests (no downloads)."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 260  # 256 bytes + 4 specials
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
# Families whose released models tie the output embedding to the input one get a "-tied" variant
# (Llama-3.2-1B, Qwen2.5-0.5B, Qwen3-0.6B, Phi-4-mini); Gemma ties always, and its tiny models do too.
TIED = ("llama-tied", "qwen2-tied", "qwen3-tied", "phi3-tied", "gemma2", "gemma3")

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
)


def tiny_config(family: str = "llama", **overrides):
    """A config of `family` small enough to train for a few steps on a CPU in seconds
    (``"llama-tied"``: the same with the output embedding tied to the input one)."""
    kw = dict(_COMMON)
    if family.endswith("-tied"):
        family = family.removesuffix("-tied")
        kw.update(tie_word_embeddings=True)
    if family == "llama":
        cls = LlamaConfig
        kw.update(head_dim=16)
    elif family == "mistral":
        cls = MistralConfig
        kw.update(head_dim=16, sliding_window=64)
    elif family == "qwen2":
        cls = Qwen2Config
    elif family == "qwen3":
        cls = Qwen3Config
        kw.update(head_dim=16)
    elif family == "gemma2":
        cls = Gemma2Config
        kw.update(head_dim=16, query_pre_attn_scalar=16, sliding_window=32,
                  attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    elif family == "gemma3":
        cls = Gemma3TextConfig
        kw.update(head_dim=16, query_pre_attn_scalar=16, sliding_window=32, num_hidden_layers=3,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    elif family == "phi3":
        cls = Phi3Config
        kw.update(hidden_size=96, num_attention_heads=4, num_key_value_heads=2,  # head_dim 24
                  original_max_position_embeddings=256)
    else:
        raise ValueError(f"unknown family {family!r}")
    kw.update(overrides)
    return cls(**kw)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    attn = "eager" if family.startswith("gemma") else "sdpa"  # softcapping needs eager attention
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.eval()


def is_tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def byte_tokenizer(*, bos: bool = False, merges: tuple[tuple[str, str], ...] = ()) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with ids 0..255 for bytes plus <s>, </s>, <pad>, <unk>.

    ``bos=True``: it puts <s> in front of text (Llama-2, Gemma) where special tokens are asked for.
    ``merges``: text pairs merged into one token each, ids from 260 on (more than the tiny models'
    vocabulary: for tokenizer tests), in order; no pre-tokenizer splits text, so a merge can join
    the end of a context and the start of its continuation.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258, "<unk>": 259})
    symbols = [tuple("".join(alphabet[b] for b in part.encode()) for part in pair) for pair in merges]
    for left, right in symbols:
        vocab.setdefault(left + right, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=symbols, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 256)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    return fast


def _byte_of(ch: str) -> int:
    # GPT-2 byte-to-unicode mapping, inverted: printable bytes map to themselves, the rest to 256+k.
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    code = ord(ch)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "kings", "sing",
         "of", "old", "river", "towns"]


def word_text(words: int, rng: random.Random) -> str:
    """`words` random words from a small vocabulary (text a tiny model can learn something from)."""
    return " ".join(rng.choice(WORDS) for _ in range(words))


def write_corpus(folder: Path, docs: int, words: int, suffix: str = ".txt", seed: int = 0) -> Path:
    """`docs` files of random words in `folder`, drawn from one seeded generator."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(docs):
        (folder / f"doc{i}{suffix}").write_text(word_text(words, rng))
    return folder


def save_tiny(folder: Path, family: str) -> Path:
    """A tiny model of `family` and the byte tokenizer saved as a transformers folder."""
    tiny_model(family).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder
