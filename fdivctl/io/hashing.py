"""Content hashes for provenance: files, model directories, tokenizers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

_BLOCK = 1 << 22
# Files that define a model's outputs (weights and config); tokenizer files are hashed separately.
_MODEL_FILES = ("*.safetensors", "*.bin", "config.json", "generation_config.json")
# Weight files larger than this are fingerprinted by sampled blocks instead of read whole.
_FULL_HASH_LIMIT = 64 << 20
_SAMPLES, _SAMPLE_BYTES = 256, 1 << 16


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def token_digest(tokens) -> str:
    """sha256 (hex) of a token-id sequence, as int64: what a logit store records of each prompt it scored."""
    return hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes()).hexdigest()


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file, or for a large one of its size, head and 256 evenly spaced 64 KiB blocks.

    The head of a safetensors file is its header (every tensor's name, dtype,
    shape and offset); two checkpoints of one architecture that differ in
    training differ in practically every block, so the sample tells them apart
    while a 100 GB teacher is fingerprinted in milliseconds, not minutes.
    """
    path = Path(path)
    size = path.stat().st_size
    if size <= _FULL_HASH_LIMIT:
        return file_sha256(path)
    digest = hashlib.sha256(f"size={size}".encode())
    with open(path, "rb") as fh:
        digest.update(fh.read(_BLOCK))
        for i in range(_SAMPLES):
            fh.seek((size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
            digest.update(fh.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def model_hash(model_dir: str | Path) -> str:
    """Content fingerprint of a model directory: its weight and config files, by name and bytes."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    files = sorted({p for pattern in _MODEL_FILES for p in model_dir.glob(pattern)})
    for path in files:
        digest.update(path.name.encode())
        digest.update(file_fingerprint(path).encode())
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
