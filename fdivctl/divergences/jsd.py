"""Generalized Jensen–Shannon divergence.

``JSD_β(p, q) = β KL(p‖m) + (1−β) KL(q‖m)`` with ``m = βp + (1−β)q``, β ∈ (0, 1).
β = 0.5 is the symmetric JS divergence; this is the convention of TRL's GKD
(Agarwal et al. 2024, "On-Policy Distillation of Language Models", arXiv
2306.13649, Eq. 2).  As β → 0, JSD/β → KL(p‖q); as β → 1, JSD/(1−β) → KL(q‖p):
the end points are the limits of the *rescaled* JSD, so they are exposed as the
registry entries ``fkl`` and ``rkl`` rather than through β (DESIGN.md).

Generator (u = q/p): ``f(u) = (1−β) u log u − (β + (1−β)u) log(β + (1−β)u)``;
at β = 0.5 this is ``½[u log u − (1+u) log((1+u)/2)]`` (METHODS.md §1).
"""

from __future__ import annotations

import torch

from fdivctl.divergences.base import Divergence, check_open_unit
from fdivctl.divergences.kl import kl_terms
from fdivctl.divergences.logspace import log_mixture


class GeneralizedJSD(Divergence):
    name = "jsd"
    summary = "generalized JS: β KL(p‖m) + (1−β) KL(q‖m), m = βp + (1−β)q"

    def __init__(self, beta: float = 0.5):
        self.beta = check_open_unit("beta", beta, self.name)

    @property
    def params(self):
        return {"beta": self.beta}

    def pointwise(self, log_q, log_p):
        log_m = log_mixture(log_p, log_q, self.beta)
        return self.beta * kl_terms(log_p, log_m) + (1.0 - self.beta) * kl_terms(log_q, log_m)

    def generator(self, log_ratio):
        u = log_ratio.exp()
        mix = self.beta + (1.0 - self.beta) * u
        return (1.0 - self.beta) * u * log_ratio - mix * torch.log(mix)
