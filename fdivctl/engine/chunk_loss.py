"""Per-token distillation losses that are not a sum of f-divergence summands.

An f-divergence (:class:`fdivctl.divergences.Divergence`) reads a token's
aligned ``(log q, log p)`` support and sums elementwise terms.  Some losses
need more of the chunk: a ranking of the support and the true token
(Plackett–Luce, :mod:`fdivctl.objectives.pld`), every token of the chunk at
once (batch-wise optimal transport, :mod:`fdivctl.objectives.sinkhorn`), or
per-token statistics that choose the weighting (BD-KD,
:mod:`fdivctl.objectives.bdkd`).  A :class:`ChunkLoss` gets the chunk's full
student log-softmax, the target and the rows, and returns one value per row.
The engine treats it as the ``divergence`` output: same chunking, masks,
weights and gradients, on the PyTorch path (autograd on the chunk).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from fdivctl.engine.targets import Target


class ChunkLoss(ABC):
    """A per-token loss computed from a chunk's student ``log q [c, V]`` and the target."""

    name: ClassVar[str]
    #: rows the loss must see together (batch-wise losses); None: any chunking gives the same values
    chunk_rows: int | None = None

    @abstractmethod
    def chunk_values(self, log_q: torch.Tensor, target: Target, rows: slice, temperature: float) -> torch.Tensor:
        """``[c]`` values for ``rows``; ``log_q`` is the student's log-softmax at ``temperature`` (differentiable)."""

    def bind(self, token_ids: torch.Tensor, teacher_token_logprob: torch.Tensor | None = None) -> ChunkLoss:
        """The loss for a batch whose true tokens are ``token_ids`` (and, from a store, their teacher log-probs);
        losses that read them override it."""
        return self

    def take(self, index: torch.Tensor) -> ChunkLoss:
        """The loss restricted to rows ``index`` (losses holding per-token data override it)."""
        return self

    def validate(self, n_tokens: int, target: Target) -> None:
        """Raise ValueError unless the loss can run on ``n_tokens`` rows of ``target`` (default: it always can)."""
        return None

    def __repr__(self) -> str:
        return self.name
