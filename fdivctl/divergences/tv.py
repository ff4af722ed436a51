"""Total variation distance ``TV(p, q) = ½ Σ |p − q|``; generator ``f(u) = ½|u − 1|``.

Bounded in [0, 1].  Not differentiable where ``p_i = q_i``; the subgradient 0 is used there.
"""

from __future__ import annotations

from fdivctl.divergences.base import Divergence


class TotalVariation(Divergence):
    name = "tv"
    summary = "total variation ½ Σ |p − q|; f(u) = ½|u − 1|"

    def pointwise(self, log_q, log_p):
        return 0.5 * (log_p.exp() - log_q.exp()).abs()

    def generator(self, log_ratio):
        return 0.5 * log_ratio.expm1().abs()
