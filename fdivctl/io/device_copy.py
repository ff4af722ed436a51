"""Host → device copies that do not stall the host.

A copy from pageable host memory to a CUDA device (``tensor.to("cuda")``)
returns only once the device has run everything queued before it: a copy
made after a forward pass was queued makes the host wait for that forward,
and the device then idles while the host prepares its next work.  Through
pinned memory the copy is queued like a kernel (``non_blocking=True``; the
caching host allocator keeps the pinned buffer until the copy has run).
"""

from __future__ import annotations

import torch


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the host) on ``device``, queued without waiting on CUDA."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def upload_vectors(vectors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Host vectors of one length, as float32 on ``device`` through one copy (one pinned buffer, not one each)."""
    names = list(vectors)
    stacked = upload(torch.stack([vectors[name].float() for name in names]), device)
    return dict(zip(names, stacked.unbind(0)))
