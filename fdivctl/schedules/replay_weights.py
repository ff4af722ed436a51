"""RECAP's objective weights: replay of general-domain data reweighted online from convergence and instability.

Source: Phan et al. 2025, "Beyond Reasoning Gains: Mitigating General
Capabilities Forgetting in Large Reasoning Models" (arXiv 2510.21978;
METHODS.md §2.1).  The RL task and each replayed general-domain objective k
(K objectives in all) report a loss-like signal ℓ_k ≥ 0 each optimizer step
(lower is better).  Over the last W steps (``--recap-window``):

* convergence ``c_k = mean(second half of the window) / mean(first half)``,
  clamped to [0, 4]: < 1 still improving, ≈ 1 flat (saturated), > 1 regressing
  (forgetting);
* instability ``v_k = std / mean`` over the window (coefficient of variation);

and the weights are a softmax over ``s_k = c_k + v_k`` at temperature T
(``--recap-temperature``), scaled so they sum to K:

    w_k = K · exp(s_k / T) / Σ_j exp(s_j / T)

Until every objective has W signals the weights are uniform (1).  An
objective that regresses or oscillates gains weight; one that improves
steadily cedes it.  The paper's abstract names the two signals and the
direction (away from saturated objectives, toward underperforming or
volatile ones); its formulas were not readable here, so this form — Dynamic
Weight Average (Liu et al. 2019, "End-to-End Multi-Task Learning with
Attention", Eq. 7) over a short window plus a coefficient-of-variation term —
is our reading.  Signals: the replayed objective's own loss; for the RL task
the mean NLL −log π_θ of the tokens of positive-advantage responses (how well
the policy fits what the task rewards; it falls as RL succeeds and is
measured the same way staged and online).
"""

from __future__ import annotations

import math

CONVERGENCE_MAX = 4.0
EPS = 1e-8


class RecapWeights:
    """The weights of ``n_objectives`` objectives (task first), updated from their signals step by step."""

    def __init__(self, n_objectives: int, window: int = 4, temperature: float = 1.0):
        if window < 2:
            raise ValueError("the RECAP window must be ≥ 2 steps")
        if not temperature > 0:
            raise ValueError("the RECAP temperature must be > 0")
        self.n, self.window, self.temperature = n_objectives, window, temperature
        self.history: list[list[float]] = [[] for _ in range(n_objectives)]

    def update(self, signals: list[float | None]) -> None:
        """Record one step's signals (None: the objective had no signal this step, e.g. no positive response)."""
        for history, value in zip(self.history, signals):
            if value is not None and math.isfinite(value):
                history.append(max(0.0, float(value)))
                del history[: -self.window]

    def scores(self) -> list[float] | None:
        """``s_k = c_k + v_k`` per objective; None until every objective has a full window."""
        if any(len(h) < self.window for h in self.history):
            return None
        half = self.window // 2
        scores = []
        for h in self.history:
            early, recent = sum(h[:half]) / half, sum(h[-half:]) / half
            mean = sum(h) / len(h)
            convergence = min(CONVERGENCE_MAX, (recent + EPS) / (early + EPS))
            instability = math.sqrt(sum((x - mean) ** 2 for x in h) / len(h)) / (mean + EPS)
            scores.append(convergence + instability)
        return scores

    def weights(self) -> list[float]:
        scores = self.scores()
        if scores is None:
            return [1.0] * self.n
        top = max(scores)
        exp = [math.exp((s - top) / self.temperature) for s in scores]
        return [self.n * e / sum(exp) for e in exp]

    def state_dict(self) -> dict:
        return {"history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [list(h) for h in state["history"]]
