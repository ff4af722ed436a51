"""pass@k and maj@k per prompt.

pass@k is the unbiased estimator of Chen et al. 2021 ("Evaluating Large
Language Models Trained on Code", arXiv 2107.03374, Eq. 1):
``1 − C(n−c, k) / C(n, k)`` for n samples of which c are correct, computed as
``1 − Π_{i=n−c+1..n} (1 − k/i)`` so that n = 1024 neither overflows nor
loses precision (METHODS.md §2.3).  verl's bootstrap ``1 − (1 − c/n)^k`` is
biased low and is not used.

maj@k: the majority answer among the first k samples (by ``sample_idx``) is
correct; ties go to the answer seen first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt with ``n`` samples, ``c`` correct; needs ``k ≤ n``."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 ≤ c ≤ n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 ≤ k ≤ n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)
    return float(1.0 - np.prod(1.0 - k / i))


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool], k: int) -> bool:
    """Whether the most frequent answer among the first ``k`` samples is a correct one.

    ``answers`` are normalized answers (None = no answer, never a majority);
    an answer counts as correct if any sample giving it was marked correct.
    """
    first = [(a, c) for a, c in zip(answers[:k], correct[:k]) if a is not None]
    if not first:
        return False
    counts = Counter(a for a, _ in first)
    top = max(counts.values())
    winner = next(a for a, _ in first if counts[a] == top)
    return any(c for a, c in first if a == winner)


def solved(pass_k: float) -> bool:
    """A prompt counts as solved at k when pass@k ≥ ½ (at least as likely as not within k tries).

    The product form can land a hair below an exact ½ (4 of 8 at k = 1 gives
    0.4999…), hence the 1e-9 slack.
    """
    return pass_k >= 0.5 - 1e-9
