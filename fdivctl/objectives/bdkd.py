"""BD-KD: a per-token balance of forward and reverse KL chosen by the entropy gap.

Source: Amara et al., "BD-KD: Balancing the Divergences for Online Knowledge
Distillation" (arXiv 2212.12965).  The student's loss weights forward KL
``KL(p‖q)`` and reverse KL ``KL(q‖p)`` sample by sample, from the entropies of
the student ``H(q)`` and the teacher ``H(p)``:

    D = KL(p‖q) + μ · KL(q‖p)   where H(q) > H(p)   (student less sure: favour mode-seeking)
    D = μ · KL(p‖q) + KL(q‖p)   otherwise            (student over-confident: favour mass-covering)

Here a "sample" is a token.  The paper's exact weights are not in METHODS.md;
this two-level rule with one parameter ``μ`` (default 2) is our reading of its
description (sample-wise weighting guided by the entropy gap) and says so in
the closing note.  The choice of branch carries no gradient.  With a top-k
store the entropies and divergences are those of the k+1 buckets.
"""

from __future__ import annotations

import torch

from fdivctl.divergences.kl import ForwardKL, ReverseKL
from fdivctl.engine.chunk_loss import ChunkLoss
from fdivctl.engine.targets import Target


def entropy(log_x: torch.Tensor) -> torch.Tensor:
    """``−Σ x log x`` over the last dimension."""
    return -(log_x.exp() * log_x).sum(-1)


class BalancedKL(ChunkLoss):
    name = "bdkd"

    def __init__(self, mu: float = 2.0):
        if not mu > 0:
            raise ValueError(f"bdkd: mu must be > 0, got {mu}")
        self.mu = float(mu)

    def chunk_values(self, log_q, target: Target, rows, temperature):
        log_q_s, log_p_s = target.support(rows, log_q, temperature)
        forward = ForwardKL().support_divergence(log_q_s, log_p_s)
        reverse = ReverseKL().support_divergence(log_q_s, log_p_s)
        unsure = (entropy(log_q_s) > entropy(log_p_s)).detach()
        return torch.where(unsure, forward + self.mu * reverse, self.mu * forward + reverse)

    def __repr__(self) -> str:
        return f"bdkd(mu={self.mu})"
