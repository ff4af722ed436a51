"""Amari α-divergence, α ∈ (0, 1).

``D_α(q‖p) = (1 − Σ p^α q^(1−α)) / (α(1−α))`` (Amari 1985; Cichocki & Amari 2010,
"Families of Alpha- Beta- and Gamma-Divergences", Eq. 4, with their α playing
the role of our α on p).  Generator ``f(u) = (u^(1−α) − (1−α)u − α) / (α(α−1))``
(METHODS.md §1).  Limits: α → 1 gives KL(p‖q) (forward), α → 0 gives KL(q‖p)
(reverse); α = ½ is 4 × squared Hellinger.

The summand ``(αp + (1−α)q − p^α q^(1−α)) / (α(1−α))`` sums to the closed form
for normalised p, q and is non-negative term by term (weighted AM–GM).
"""

from __future__ import annotations

from fdivctl.divergences.base import Divergence, check_open_unit


class AlphaDivergence(Divergence):
    name = "alpha"
    summary = "Amari α: (1 − Σ p^α q^(1−α)) / (α(1−α))"

    def __init__(self, alpha: float = 0.5):
        self.alpha = check_open_unit("alpha", alpha, self.name)

    @property
    def params(self):
        return {"alpha": self.alpha}

    def pointwise(self, log_q, log_p):
        a = self.alpha
        geometric = (a * log_p + (1.0 - a) * log_q).exp()
        return (a * log_p.exp() + (1.0 - a) * log_q.exp() - geometric) / (a * (1.0 - a))

    def generator(self, log_ratio):
        a = self.alpha
        return (((1.0 - a) * log_ratio).exp() - (1.0 - a) * log_ratio.exp() - a) / (a * (a - 1.0))
