"""Per-prompt records and their aggregates for one run (pure computation, no I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fdivctl.metrics.best_of_n import best_of_n_reward
from fdivctl.metrics.calibration import expected_calibration_error
from fdivctl.metrics.diversity import distinct_correct, distinct_n
from fdivctl.metrics.passk import majority_correct, pass_at_k, solved


@dataclass
class PromptSamples:
    """The sampled (non-greedy) rows of one prompt, ordered by sample_idx."""

    prompt_id: str
    domain: str
    correct: list[bool]
    answers: list[str | None]
    rewards: list[float]
    tokens: list[Sequence]  # per sample: token ids (or words) for distinct-n and length
    confidence: list[float] | None = None
    greedy_correct: bool | None = None
    pass_k: dict[int, float] = field(default_factory=dict)
    maj_k: dict[int, bool] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def c(self) -> int:
        return sum(self.correct)


def score_prompts(prompts: list[PromptSamples], ks: list[int]) -> None:
    """Fill each prompt's pass@k and maj@k."""
    for p in prompts:
        for k in ks:
            p.pass_k[k] = pass_at_k(p.n, p.c, k)
            p.maj_k[k] = majority_correct(p.answers, p.correct, k)


def aggregate(prompts: list[PromptSamples], ks: list[int], bootstrap: int = 0, seed: int = 0) -> dict:
    """Run-level figures over ``prompts`` (means over prompts; 95 % bootstrap CIs over prompts)."""
    figures: dict = {"prompts": len(prompts), "samples": sum(p.n for p in prompts)}
    for k in ks:
        values = np.array([p.pass_k[k] for p in prompts])
        figures[f"pass@{k}"] = float(values.mean())
        if bootstrap:
            rng = np.random.default_rng(seed)
            means = values[rng.integers(0, len(values), size=(bootstrap, len(values)))].mean(axis=1)
            figures[f"pass@{k}_ci95"] = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
        figures[f"maj@{k}"] = float(np.mean([p.maj_k[k] for p in prompts]))
        figures[f"best_of_{k}_reward"] = float(np.mean([best_of_n_reward(p.rewards, k) for p in prompts]))
    figures["mean_reward"] = float(np.mean([r for p in prompts for r in p.rewards]))
    figures["distinct_correct"] = float(np.mean([distinct_correct(p.answers, p.correct) for p in prompts]))
    sequences = [t for p in prompts for t in p.tokens]
    for n in (1, 2, 3, 4):
        figures[f"distinct_{n}"] = distinct_n(sequences, n)
    figures["mean_length"] = float(np.mean([len(t) for t in sequences]))
    greedy = [p.greedy_correct for p in prompts if p.greedy_correct is not None]
    if greedy:
        figures["greedy_pass@1"] = float(np.mean(greedy))
    if all(p.confidence is not None for p in prompts):
        figures["ece"] = expected_calibration_error(
            [x for p in prompts for x in p.confidence], [c for p in prompts for c in p.correct]
        )
    return figures


def versus_base(run: list[PromptSamples], base: list[PromptSamples], ks: list[int]) -> dict:
    """Forgetting and new solves at each k over the prompts both runs share.

    forgetting@k = share of the prompts the base solves at k that the run does not;
    newly_solved@k = share of the prompts the base does not solve that the run does.
    Either is None (undefined, not 0) when the base solves all or none of the shared prompts at k, or when the
    runs share no prompt.
    """
    base_by_id = {p.prompt_id: p for p in base}
    shared = [(p, base_by_id[p.prompt_id]) for p in run if p.prompt_id in base_by_id]
    figures: dict = {"shared_prompts": len(shared)}
    for k in ks:
        base_solved = [r for r, b in shared if solved(b.pass_k[k])]
        base_unsolved = [r for r, b in shared if not solved(b.pass_k[k])]
        figures[f"forgetting@{k}"] = (
            sum(not solved(r.pass_k[k]) for r in base_solved) / len(base_solved) if base_solved else None
        )
        figures[f"newly_solved@{k}"] = (
            sum(solved(r.pass_k[k]) for r in base_unsolved) / len(base_unsolved) if base_unsolved else None
        )
    return figures
