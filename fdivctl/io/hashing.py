"""Content hashes for provenance: files, model directories, tokenizers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

_BLOCK = 1 << 22
# Files that define a model's outputs (weights and config); tokenizer files are hashed separately.
_MODEL_FILES = ("*.safetensors", "*.bin", "config.json", "generation_config.json")


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def model_hash(model_dir: str | Path) -> str:
    """sha256 over the weight and config files of a model directory (names and bytes)."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    files = sorted({p for pattern in _MODEL_FILES for p in model_dir.glob(pattern)})
    for path in files:
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what maps text to ids: the fast tokenizer's canonical JSON, else its vocabulary.

    Two tokenizers with the same hash produce the same ids for the same text.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        payload = json.dumps(spec, sort_keys=True)
    else:
        payload = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(payload.encode()).hexdigest()
