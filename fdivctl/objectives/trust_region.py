"""ERPD's stage-2 trust region: distill only the tokens on which the stage-1 teacher stayed near the base policy.

Seed: "Extreme Region Policy Distillation" (Chen, Wang, Yan 2026, arXiv
2605.25582; METHODS.md §2.1).  Stage 1 optimizes aggressively off-policy on
fixed data; its policy's token-level distributions (a ``teacher-logits`` store)
are then distilled into the *base* policy "under trust-region constraints,
filtering harmful drift" while preserving useful signal.  METHODS.md does not
restate the paper's constraint and we could not read it here; ours filters
the teacher's signal by how far the teacher moved from the base on the data's
own tokens: with ``p_T`` the stage-1 policy (the teacher) and ``q_0`` the base
(the student before distillation, a frozen copy),

    m_t = 1[ |log p_T(y_t) − log q_0(y_t)| ≤ ε ]

multiplies token t's distillation loss: where stage 1 drifted by more than a
factor e^ε on a token it was trained on, that drift is treated as harmful and
not distilled; the moderate moves are.  The mask has no gradient.
"""

from __future__ import annotations

import torch


def trust_region_mask(teacher_logprob: torch.Tensor, base_logprob: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``m_t`` per token (float 0/1) from the teacher's and the base's log-probs of the tokens."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    return ((teacher_logprob.detach().float() - base_logprob.detach().float()).abs() <= epsilon).float()
