"""f-DPG: approximate an explicit target distribution with any f-divergence by distributional policy gradient.

Go et al. 2023, "Aligning Language Models with Preferences through
f-divergence Minimization" (arXiv 2302.08215).  The target is an energy-based
model ``p(y|x) = P(x, y) / Z(x)``:

* ``ref*exp(r/beta)``: ``P = π_ref(y|x) · exp(r(y)/β)`` (the KL-regularized RL optimum);
* ``ref*filter``: ``P = π_ref(y|x) · 1[y correct]`` (π_ref conditioned on the verifier).

With ``u(y) = π_θ(y|x) / p(y|x)`` and our convention ``D_f(π_θ‖p) = E_p[f(u)]``,

    ∇_θ D_f(π_θ‖p) = E_{y∼π_θ}[ f′(u(y)) ∇_θ log π_θ(y|x) ]       (paper, Eq. 5–6)

so the policy-gradient "advantage" of a sample is ``−(f′(u) − b)``, with the
baseline ``b`` the mean of ``f′(u)`` over the prompt's group.  ``Z(x)`` is
estimated per prompt by importance sampling over its group,
``Ẑ = mean_i P(y_i)/π_θ(y_i)``, and ``log u`` is clamped to ±20 before ``f′``
(for ``ref*filter`` an incorrect sample has ``p = 0``, i.e. ``u = ∞``; the
clamp makes reverse KL's unbounded ``f′`` a large finite penalty there).
``f′`` is taken from the registry's generator by autograd,
``f′(u) = (df/d log u) / u``, so every registry divergence works
(forward KL gives ``−1/u``, reverse KL ``log u + 1``).  The sequence
log-probabilities come from the rollouts (``π_θ``, the sampling policy) and
from the reference model.
"""

from __future__ import annotations

import math

import torch

from fdivctl.divergences import Divergence
from fdivctl.divergences.base import LOG_RATIO_CLAMP
from fdivctl.objectives.grpo import group_sum

TARGETS = ("ref*exp(r/beta)", "ref*filter")


def log_target(ref_logprob: torch.Tensor, rewards: torch.Tensor, correct: torch.Tensor, target: str,
               beta: float) -> torch.Tensor:
    """``log P(x, y)`` per response (``-inf`` where the filter rejects)."""
    if target == "ref*exp(r/beta)":
        return ref_logprob.double() + rewards.double() / beta
    if target == "ref*filter":
        return torch.where(correct, ref_logprob.double(), torch.full_like(ref_logprob.double(), -math.inf))
    raise ValueError(f"target {target!r}; valid: {', '.join(TARGETS)}")


def advantages(divergence: Divergence, policy_logprob: torch.Tensor, target_logp: torch.Tensor,
               groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``−(f′(u) − b)`` per response, ``log u`` per response) from sequence log-probs ``[S]``."""
    log_weight = target_logp - policy_logprob.double()  # log P/π_θ
    count = group_sum(torch.ones_like(log_weight), groups)
    peak = torch.full(count.shape, -math.inf, dtype=torch.float64).scatter_reduce(0, groups, log_weight, "amax")
    finite_peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = group_sum(torch.exp(log_weight - finite_peak[groups]), groups)
    log_z = torch.log(total / count) + finite_peak  # -inf when the whole group is filtered out
    log_u = (log_z[groups] - log_weight).nan_to_num(nan=LOG_RATIO_CLAMP).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    slope = divergence.fprime(log_u.detach())
    baseline = group_sum(slope, groups) / count
    return (-(slope - baseline[groups])).float(), log_u.float()
