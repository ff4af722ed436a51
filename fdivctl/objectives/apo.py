"""APO: Asymmetric Policy Optimization — DADS on positive responses, STCR on negative ones.

Seed: "APO: Enhancing Reasoning Ability of MLLMs via Asymmetric Policy
Optimization" (Hong et al. 2025, arXiv 2506.21655; METHODS.md §2.1).  The
responses of a group are split by the sign of their advantage.

**DADS** (Difficulty-Adaptive Divergence Shaping): a prompt's difficulty is
``d = 1 − (correct samples / group size)``.  A response with a positive
advantage has its divergence term weighted by

    w(d) = 1 − exp(−e · (1 − d)),      w(0) = w(1) = 1,

so easy prompts keep the full KL (hold on to what the model knows) and hard
prompts, whose rare correct answers are the discoveries, are held back less.
Other responses keep weight 1.  The weight multiplies the response's share of
the regularizer; the formula is the authors' public code (View-R1,
``calculate_kl_weight``), which the paper does not restate in METHODS.md.

**STCR** (Suboptimal Trajectory Complexity Regularization): an incorrect
response longer than the mean length ``L̄⁺`` of its group's correct responses
has its (negative) advantage scaled by

    s = 2 − b^(−(L − L̄⁺)),      b = 1.00001 (the public code's base),

so overlong wrong answers are pushed down harder; groups without a correct
response, and incorrect responses no longer than ``L̄⁺``, keep ``s = 1``.
Complexity is measured in completion tokens.
"""

from __future__ import annotations

import math

import torch

from fdivctl.objectives.grpo import group_sum

STCR_BASE = 1.00001


def dads_weight(difficulty: torch.Tensor) -> torch.Tensor:
    """``w(d) = 1 − exp(−e(1 − d))`` elementwise, 1 at ``d ∈ {0, 1}``."""
    weight = 1.0 - torch.exp(-math.e * (1.0 - difficulty.double()))
    return torch.where((difficulty == 0) | (difficulty == 1), torch.ones_like(weight), weight).float()


def group_accuracy(correct: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per response, the share of correct responses in its group."""
    count = group_sum(torch.ones(len(groups)), groups)
    hits = group_sum(correct, groups)
    return (hits / count)[groups]


def divergence_scale(advantages: torch.Tensor, correct: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """DADS: per response, the weight of its divergence term (``w(d)`` where the advantage is positive, else 1)."""
    weight = dads_weight(1.0 - group_accuracy(correct, groups))
    return torch.where(advantages > 0, weight, torch.ones_like(weight))


def stcr_scale(lengths: torch.Tensor, correct: torch.Tensor, groups: torch.Tensor,
               base: float = STCR_BASE) -> torch.Tensor:
    """STCR: per response, the factor its advantage is multiplied by (see the module docstring)."""
    right = correct.double()
    hits = group_sum(right, groups)
    right_length = group_sum(right * lengths.double(), groups)
    mean_right = (right_length / hits.clamp(min=1))[groups]
    excess = lengths.double() - mean_right
    penalized = (~correct) & (excess > 0) & (hits[groups] > 0)
    scale = 2.0 - torch.pow(torch.tensor(base, dtype=torch.float64), -excess)
    return torch.where(penalized, scale, torch.ones_like(scale)).float()
