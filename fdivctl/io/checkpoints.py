"""Loading models and tokenizers from local ``save_pretrained`` directories."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from fdivctl.errors import UserError

#: files a saved tokenizer has at least one of (fast, sentencepiece, BPE or WordPiece vocabularies)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")
DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; anything else as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device torch knows (try cpu, cuda, cuda:1)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available")
    return resolved


def check_model_dir(path: str | Path, role: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{role} {path}: not a directory (expected a save_pretrained model directory)")
    if not (path / "config.json").is_file():
        raise UserError(f"{role} {path}: no config.json, so not a transformers model directory")
    return path


def load_tokenizer(path: str | Path, role: str = "model"):
    from transformers import AutoTokenizer

    path = check_model_dir(path, role)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        # transformers 5 builds an empty tokenizer from config.json alone: every prompt would encode to no tokens
        raise UserError(f"{role} {path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, …): save the "
                        "tokenizer with the model (tokenizer.save_pretrained(DIR))")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"{role} {path}: cannot load its tokenizer ({err})") from None


def load_causal_lm(path: str | Path, dtype: str = "auto", device: str = "auto", role: str = "model"):
    """A causal LM in eval mode on ``device``; ``dtype`` auto keeps the checkpoint's dtype (fp32 on CPU)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    path = check_model_dir(path, role)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    target = resolve_device(device)
    torch_dtype = DTYPES[dtype] or ("auto" if target.type == "cuda" else torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        raise UserError(f"{role} {path}: cannot load it as a causal LM ({err})") from None
    if target.type == "cuda":
        attention_without_shape_plans()
    return model.to(target).eval()


def attention_without_shape_plans() -> None:
    """Take cuDNN out of PyTorch's scaled-dot-product-attention backends, for the whole process (FlashAttention,
    then the memory-efficient kernel, then math remain, in that order).

    torch 2.11 runs cuDNN attention first on an H100 or H200 (``bench/results``' profiles), and cuDNN builds an
    execution plan for every shape it has not met, forward and backward.  fdivctl's batches are right-padded to
    their longest row (``Sequences.batch``), so in teacher-logits, distill and train nearly every batch has a
    length of its own and paid the plan (generation with ``--backend hf``, whose cache grows a position per step,
    was not measured).
    ``bench/attention_backend.py`` on an H200 (torch 2.11; hidden 896, 24 layers, bf16): a new shape of 16 rows
    × 1024 tokens cost cuDNN 60 ms more than a seen one without gradients and 149 ms with them (FlashAttention:
    2 and 1 ms), where a seen one ran at the same speed under both (0.97× and 1.00×); at 2 rows × 8192 tokens a
    new shape cost cuDNN 48 / 107 ms, and a seen one ran 1.2× faster under cuDNN (0.81× / 0.82× the time), which
    a run pays back only where a shape comes back several times.
    """
    torch.backends.cuda.enable_cudnn_sdp(False)


def text_config(config):
    """The language model's part of a config (a multimodal model's ``text_config``; the config itself otherwise)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def context_length(config) -> int | None:
    """The longest sequence (prompt + completion, in tokens) a model's config says it takes; None when it names none.

    ``max_position_embeddings`` (``n_positions`` for GPT-2-style configs), raised by a RoPE scaling section (YaRN,
    linear, dynamic NTK) to ``factor`` × its ``original_max_position_embeddings``: Qwen2.5's long-context recipe
    adds ``rope_scaling = {type: yarn, factor: 4, original_max_position_embeddings: 32768}`` and keeps
    ``max_position_embeddings`` at 32768, for a 131072-token context; Llama 3.1 states its extended length in
    ``max_position_embeddings`` itself (the larger of the two counts).
    """
    config = text_config(config)
    base = next((getattr(config, name) for name in ("max_position_embeddings", "n_positions", "max_sequence_length")
                 if isinstance(getattr(config, name, None), int)), None)
    if base is None:
        return None
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    factor = rope.get("factor") if kind != "default" else None
    if not factor:
        return base
    return max(base, int(rope.get("original_max_position_embeddings") or base) * int(factor))


@dataclass(frozen=True)
class ModelLimits:
    """The token sequences every model of a run takes: ids below ``vocab_size``, at most ``context`` tokens
    (None: no model names a limit); ``vocab_of``/``context_of`` say which model sets each bound, for messages."""

    vocab_size: int
    context: int | None
    vocab_of: str
    context_of: str | None


def model_limits(*models: tuple[str | Path, str]) -> ModelLimits:
    """The tightest bounds of the ``(model directory, role)`` pairs, read from their ``config.json`` (no weights)."""
    from transformers import AutoConfig

    vocab, context = None, None
    for path, role in models:
        path = check_model_dir(path, role)
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise UserError(f"{role} {path}: cannot read its config.json ({err})") from None
        text = text_config(config)
        size, length, name = int(text.vocab_size), context_length(config), f"{role} {path}"
        if vocab is None or size < vocab[0]:
            vocab = (size, name)
        if length is not None and (context is None or length < context[0]):
            context = (length, name)
    if vocab is None:
        raise ValueError("model_limits needs at least one model")
    return ModelLimits(vocab[0], context[0] if context else None, vocab[1], context[1] if context else None)
