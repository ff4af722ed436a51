"""Diversity of completions and of correct answers.

* distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for
  Neural Conversation Models", arXiv 1510.03055): unique n-grams / all n-grams
  over a set of completions (token ids when available, else whitespace words);
* distinct correct answers: the number of different normalized answers among
  a prompt's correct samples (what a mode-seeking divergence collapses).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def distinct_n(sequences: Iterable[Sequence], n: int) -> float:
    """Share of unique n-grams among all n-grams of ``sequences`` (0 when there are none)."""
    seen, total = set(), 0
    for seq in sequences:
        seq = tuple(seq)
        for i in range(len(seq) - n + 1):
            seen.add(seq[i : i + n])
            total += 1
    return len(seen) / total if total else 0.0


def distinct_correct(answers: Sequence[str | None], correct: Sequence[bool]) -> int:
    """Number of different normalized answers among the correct samples."""
    return len({a for a, c in zip(answers, correct) if c and a is not None})
