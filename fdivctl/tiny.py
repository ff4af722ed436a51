"""Small real models built in-process: random-init Qwen2 + a byte-level BPE tokenizer trained here.

Used by the tests, the benchmarks and the built-in demo.  Nothing is
downloaded; what reads these directories is the real ``from_pretrained(path)``
that users call on real checkpoints.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>"]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        lines.append(f"Compute {a} {op} {b}. The answer is {eval(f'{a}{op}{b}')}.")
    return lines


def train_tokenizer(out_dir: str | Path, vocab_size: int = 300, texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts`` (default :func:`corpus`); ``vocab_size=None`` merges nothing
    (one token per byte: what arithmetic on digits wants)."""
    vocab_size = vocab_size or len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bar writes to stdout, where the benchmarks print their JSON lines
    )
    tok.train_from_iterator(texts or corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>"
    )
    fast.save_pretrained(out_dir)
    return fast


def make_model(
    out_dir: str | Path,
    tokenizer,
    seed: int = 0,
    hidden: int = 128,
    layers: int = 2,
    vocab_size: int | None = None,
    max_positions: int = 512,
) -> Qwen2ForCausalLM:
    """A random Qwen2 (head_dim 64) saved with its tokenizer.

    transformers rebuilds a tokenizer by the directory's model type when it
    loads it (Qwen2's adds ``<|endoftext|>``), so the head is sized, padded to
    a multiple of 64 as real checkpoints are, from the tokenizer as users load it
    (or ``vocab_size``, when given and large enough).
    """
    torch.manual_seed(seed)
    Qwen2Config().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    loaded = AutoTokenizer.from_pretrained(out_dir)
    needed = -(-len(loaded) // 64) * 64
    if vocab_size is not None and vocab_size < len(loaded):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({len(loaded)} ids)")
    config = Qwen2Config(
        vocab_size=vocab_size or needed,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out_dir)
    return model


def random_lm(hidden: int, layers: int, vocab_size: int, seed: int = 0, max_positions: int = 4096) -> Qwen2ForCausalLM:
    """An in-memory random Qwen2 (head_dim 128, untied head) for benchmarks at real shapes; nothing is written."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128,
                         num_key_value_heads=hidden // 128, max_position_embeddings=max_positions,
                         tie_word_embeddings=False)
    return Qwen2ForCausalLM(config)
