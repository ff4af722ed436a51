"""Best-of-N: the expected best reward of N samples, and how far it moves from the policy sampled.

Best-of-N draws y_1..y_N ~ π and keeps the one with the highest reward.  From
n ≥ N samples of one prompt its expected reward is estimated without bias by
averaging over every N-subset of the n: with the rewards sorted ascending
r_(1) ≤ … ≤ r_(n), r_(i) is the subset's maximum with probability
C(i−1, N−1) / C(n, N), so

    E[max of N] = Σ_i r_(i) · C(i−1, N−1) / C(n, N)

(tied rewards give the same sum in any order).  For 0/1 rewards this is
pass@N, the estimator of Chen et al. 2021.

Its divergence from π: KL(π_bon ‖ π) ≤ log N − (N − 1)/N nats per sequence
(the analytical formula of Stiennon et al. 2020, shown to be an upper bound
by Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment
policy"; METHODS.md cites it from "Asymptotics of Language Model
Alignment").  It places best-of-N on the reward–KL plane beside trained
policies, whose KL to the same π is measured from their samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def best_of_n_reward(rewards: Sequence[float], n_best: int) -> float:
    """E[max reward of ``n_best`` samples] from the ``len(rewards)`` ≥ ``n_best`` samples of one prompt."""
    n = len(rewards)
    if not 1 <= n_best <= n:
        raise ValueError(f"best-of-N needs 1 ≤ N ≤ n, got N={n_best}, n={n}")
    total = math.comb(n, n_best)
    ordered = sorted(rewards)
    return sum(r * math.comb(i, n_best - 1) for i, r in enumerate(ordered) if i >= n_best - 1) / total


def best_of_n_kl_bound(n_best: int) -> float:
    """log N − (N − 1)/N: the KL (nats per sequence) of best-of-N to the policy it samples, at most."""
    if n_best < 1:
        raise ValueError(f"best-of-N needs N ≥ 1, got {n_best}")
    return math.log(n_best) - (n_best - 1) / n_best
