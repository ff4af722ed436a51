"""Squared Hellinger distance ``H²(p, q) = 1 − Σ √(pq) = ½ Σ (√p − √q)²``.

Generator ``f(u) = (√u − 1)² / 2``.  Bounded in [0, 1].  The summand is written
as ``½(√p − √q)²`` (non-negative term by term, no cancellation against 1).
"""

from __future__ import annotations

from fdivctl.divergences.base import Divergence


class SquaredHellinger(Divergence):
    name = "hellinger"
    summary = "squared Hellinger 1 − Σ √(pq); f(u) = (√u − 1)²/2"

    def pointwise(self, log_q, log_p):
        return 0.5 * ((0.5 * log_p).exp() - (0.5 * log_q).exp()).square()

    def generator(self, log_ratio):
        return 0.5 * (0.5 * log_ratio).expm1().square()
