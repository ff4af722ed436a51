"""DGPO: the sequence advantage redistributed over tokens by entropy-gated Hellinger deviation; no KL penalty.

Seed: "DGPO: Distribution-Guided Policy Optimization for Fine-Grained Credit
Assignment" (Jin et al. 2026, arXiv 2605.03327; METHODS.md §2.1).  Per token t
of a response, with the policy that sampled it (π_old, the model at the start
of the update) and the reference π_ref:

* deviation: the squared Hellinger distance over the vocabulary,
  ``h_t = 1 − Σ_v √(π_old(v|s_t) π_ref(v|s_t))`` ∈ [0, 1] (bounded, unlike KL;
  the registry's ``hellinger``, closed form through the engine);
* entropy gate: ``g_t = H(π_old(·|s_t)) / log V`` ∈ [0, 1], the policy's
  uncertainty — a deviation made where the policy was unsure counts, a
  confident (low-entropy) deviation is suppressed;
* score ``s_t = h_t g_t``; the response's advantage A is redistributed as

      Ã_t = A · ((1 − λ) + λ s_t / s̄),      s̄ = mean_t s_t over the response,

  which keeps ``Σ_t Ã_t = |o| A`` (the sequence's credit is moved between
  its tokens, not created).  A response with ``s̄ = 0`` (e.g. the policy
  still equals the reference) keeps ``Ã_t = A``.

The paper's exact gate and mixing are not restated in METHODS.md and we could
not read them here: ``g_t`` normalized by ``log V``, the mean-preserving form
and ``λ = --dgpo-lambda`` (default 0.5) are our reading.
"""

from __future__ import annotations

import math

import torch


def token_scale(hellinger: torch.Tensor, entropy: torch.Tensor, lengths: torch.Tensor, vocab_size: int,
                mix: float) -> torch.Tensor:
    """``Ã_t / A`` for every token of responses with ``lengths`` (per-token inputs concatenated in order)."""
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must lie in [0, 1], got {mix}")
    score = hellinger.double().clamp(0.0, 1.0) * (entropy.double() / math.log(vocab_size)).clamp(0.0, 1.0)
    owner = torch.arange(len(lengths)).repeat_interleave(lengths)
    mean = torch.zeros(len(lengths), dtype=torch.float64).index_add_(0, owner, score) / lengths.clamp(min=1)
    mean_t = mean[owner]
    relative = torch.where(mean_t > 0, score / mean_t.clamp(min=1e-300), torch.ones_like(score))
    return ((1.0 - mix) + mix * relative).float()
