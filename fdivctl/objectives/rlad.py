"""RLAD / TRRD: the PPO clipped ratio taken against a teacher–old-policy mixture.

``ρ_t = π_θ(y_t) / (λ π_T(y_t) + (1 − λ) π_old(y_t))``, then the usual
clipped surrogate ``−min(ρ A, clip(ρ, 1−ε_low, 1+ε_high) A)`` (seed:
"Reinforcement-aware Knowledge Distillation for LLM Reasoning"; METHODS.md
§2.1).  λ = 0 is GRPO's ratio; λ = 1 measures the policy against the teacher
alone, so the trust region is around the teacher's distribution on the
policy's own samples.  The denominator is formed in log space.
"""

from __future__ import annotations

import math

import torch


def mixture_logprob(teacher_logprob: torch.Tensor, old_logprob: torch.Tensor, mix_lambda: float) -> torch.Tensor:
    """``log(λ π_T + (1 − λ) π_old)`` per token from the two log-probs, ``λ ∈ [0, 1]``."""
    if not 0.0 <= mix_lambda <= 1.0:
        raise ValueError(f"mix_lambda must lie in [0, 1], got {mix_lambda}")
    if mix_lambda == 0.0:
        return old_logprob
    if mix_lambda == 1.0:
        return teacher_logprob
    return torch.logaddexp(teacher_logprob + math.log(mix_lambda), old_logprob + math.log1p(-mix_lambda))
