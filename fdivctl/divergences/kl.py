"""Kullback–Leibler divergences: forward, reverse, and the skew variants.

* forward KL ``KL(p‖q) = Σ p log(p/q)``, generator ``f(u) = −log u`` (mass-covering);
* reverse KL ``KL(q‖p) = Σ q log(q/p)``, generator ``f(u) = u log u`` (mode-seeking);
* skew KL ``KL(p‖λp + (1−λ)q)`` and skew reverse KL ``KL(q‖λq + (1−λ)p)``
  (DistiLLM, Ko et al. 2024, arXiv 2402.03898, Eq. 3–4; default λ = 0.1 as there).
"""

from __future__ import annotations

import torch

from fdivctl.divergences.base import Divergence
from fdivctl.divergences.logspace import log_mixture


def kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Summands ``a_i (log a_i − log b_i)`` of ``KL(a‖b)``."""
    return log_a.exp() * (log_a - log_b)


class ForwardKL(Divergence):
    name = "fkl"
    summary = "forward KL(p‖q) = Σ p log(p/q); f(u) = −log u"
    fprime_at_one = -1.0

    def pointwise(self, log_q, log_p):
        return kl_terms(log_p, log_q)

    def generator(self, log_ratio):
        return -log_ratio


class ReverseKL(Divergence):
    name = "rkl"
    summary = "reverse KL(q‖p) = Σ q log(q/p); f(u) = u log u"
    fprime_at_one = 1.0

    def pointwise(self, log_q, log_p):
        return kl_terms(log_q, log_p)

    def generator(self, log_ratio):
        return log_ratio.exp() * log_ratio


def _check_skew(lam: float, entry: str) -> float:
    lam = float(lam)
    if not (0.0 <= lam < 1.0):
        raise ValueError(f"{entry}: lam must lie in [0, 1), got {lam}")
    return lam


class SkewKL(Divergence):
    """``KL(p ‖ λp + (1−λ)q)``; f(u) = −log(λ + (1−λ)u). λ = 0 is forward KL."""

    name = "skl"
    summary = "skew KL(p‖λp+(1−λ)q) (DistiLLM); f(u) = −log(λ+(1−λ)u)"

    def __init__(self, lam: float = 0.1):
        self.lam = _check_skew(lam, self.name)
        self.fprime_at_one = -(1.0 - self.lam)

    @property
    def params(self):
        return {"lam": self.lam}

    def pointwise(self, log_q, log_p):
        return kl_terms(log_p, log_mixture(log_p, log_q, self.lam))

    def generator(self, log_ratio):
        return -torch.log(self.lam + (1.0 - self.lam) * log_ratio.exp())


class SkewReverseKL(Divergence):
    """``KL(q ‖ λq + (1−λ)p)``; f(u) = u log u − u log(λu + 1 − λ). λ = 0 is reverse KL."""

    name = "srkl"
    summary = "skew reverse KL(q‖λq+(1−λ)p) (DistiLLM); f(u) = u log(u/(λu+1−λ))"

    def __init__(self, lam: float = 0.1):
        self.lam = _check_skew(lam, self.name)
        self.fprime_at_one = 1.0 - self.lam

    @property
    def params(self):
        return {"lam": self.lam}

    def pointwise(self, log_q, log_p):
        return kl_terms(log_q, log_mixture(log_q, log_p, self.lam))

    def generator(self, log_ratio):
        u = log_ratio.exp()
        return u * (log_ratio - torch.log(self.lam * u + 1.0 - self.lam))
