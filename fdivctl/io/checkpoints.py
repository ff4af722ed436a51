"""Loading models and tokenizers from local ``save_pretrained`` directories."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fdivctl.errors import UserError

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
    return model.to(target).eval()
