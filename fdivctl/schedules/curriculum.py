"""Gaussian Curriculum Sampling: prompts drawn with weights peaked at a moderate accuracy.

``w_i ∝ exp(−(acc_i − μ)² / 2σ²)`` with ``acc_i`` the prompt's accuracy as last
measured during the run (FG-ExPO's GCS, seed: "fg-expo: Frontier-guided
exploration-prioritized policy optimization via adaptive kl and gaussian
curriculum"; METHODS.md §2.1: μ = 0.5, where a group's rewards vary most and
GRPO's gradient carries the most signal).  A prompt not yet sampled takes the
``pass_rate`` its row carries, else μ (full weight: it is seen early).  σ is
ours to choose (default 0.2); METHODS.md does not restate the paper's value.
Prompts are drawn without replacement, seeded per iteration.
"""

from __future__ import annotations

import torch


def gaussian_weights(accuracy: torch.Tensor, mu: float = 0.5, sigma: float = 0.2) -> torch.Tensor:
    """``exp(−(acc − μ)² / 2σ²)`` per prompt (unnormalized; the maximum is 1 at ``acc = μ``)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    return torch.exp(-((accuracy.double() - mu) ** 2) / (2 * sigma**2))


def draw(weights: torch.Tensor, k: int, seed: int) -> list[int]:
    """``k`` distinct indices drawn with probability ∝ ``weights`` (all of them when ``k ≥ len``)."""
    k = min(k, len(weights))
    # a prompt far from μ keeps a tiny, non-zero chance: exp underflows only beyond ~38σ
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(weights.clamp_min(1e-300), k, replacement=False, generator=generator).tolist()
