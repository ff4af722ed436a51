"""The shared loss engine: chunked fused lm_head + divergence (DESIGN.md)."""

from fdivctl.engine.chunk_loss import ChunkLoss
from fdivctl.engine.fused import (
    GRAD_MODES,
    TokenOutputs,
    default_chunk_size,
    default_weight_grad_rows,
    divergence_loss,
    token_loss,
    token_outputs,
)
from fdivctl.engine.sweep import KERNELS
from fdivctl.engine.targets import FullLogits, Target, TeacherHead, TeacherMixture, TopK

__all__ = [
    "ChunkLoss",
    "GRAD_MODES",
    "KERNELS",
    "FullLogits",
    "Target",
    "TeacherHead",
    "TeacherMixture",
    "TokenOutputs",
    "TopK",
    "default_chunk_size",
    "default_weight_grad_rows",
    "divergence_loss",
    "token_loss",
    "token_outputs",
]
