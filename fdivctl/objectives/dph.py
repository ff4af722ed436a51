"""DPH-RL: diversity-preserving hybrid RL (Li et al. 2025, arXiv 2509.07430; code seamoke/DPH-RL).

Pre-sampling (§3.2): k samples per training prompt from the initial policy
π_0; a prompt whose accuracy reaches the threshold (e.g. 7/8), confirmed by
one more correct sample, joins D_pef, the rest D_exp (:func:`split_prompts`).
Only the correct samples of D_pef are kept as reference samples, with their
π_0 log-probs.

Training: L = L_exp + η L_pef.  D_exp gets the PPO-clip surrogate with no KL
(:mod:`fdivctl.objectives.grpo`); D_pef gets the f-divergence D_f(π_θ‖π_0) in
generator form on the stored reference tokens y_t ~ π_0 (Eq. 6; METHODS.md §1):

    L_pef = mean_t [ f(u_t) − f′(1)(u_t − 1) ],   u_t = π_θ(y_t) / π_0(y_t)

— for forward KL ``u − 1 − log u`` (DPH-F), for JS the registry's
``½[u log u − (u+1) log((u+1)/2)]`` (the paper's code uses twice this, so its
coefficient 0.1 is our η = 0.2), for α its generator.  No reference model runs
during training.
"""

from __future__ import annotations

import torch

from fdivctl.divergences import Divergence


def split_prompts(correct: dict[str, list[bool]], k: int, threshold: float) -> tuple[list[str], list[str]]:
    """(D_pef, D_exp) prompt ids from each prompt's k + 1 verdicts in sample order.

    A prompt is in D_pef when its first ``k`` samples' accuracy is ≥ ``threshold``
    (within 1e-9) and its (k+1)-th, confirming sample is correct.
    """
    pef, exp = [], []
    for prompt_id, verdicts in correct.items():
        first = verdicts[:k]
        passed = sum(first) / len(first) >= threshold - 1e-9 and len(verdicts) > k and verdicts[k]
        (pef if passed else exp).append(prompt_id)
    return pef, exp


def reference_loss(divergence: Divergence, logprob: torch.Tensor, reference_logprob: torch.Tensor) -> torch.Tensor:
    """Per-token ``f(u) − f′(1)(u − 1)`` on reference tokens; zero with zero gradient at π_θ = π_0."""
    return divergence.reference_sample_loss(logprob - reference_logprob)
