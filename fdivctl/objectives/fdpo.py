"""f-DPO: direct preference optimization under an f-divergence (Wang et al. 2023, arXiv 2309.16240).

With u = π_θ(y|x) / π_ref(y|x) for a whole response (log u = sum of its
token log-ratios), chosen y_w and rejected y_l:

    L = −log σ(β f′(u_w) − β f′(u_l))                          (Theorem 1 / Eq. 9)

f′ per divergence (Table 1 of the paper): reverse KL ``log u + 1`` (standard
DPO, Rafailov et al. 2023); forward KL ``−1/u``; Jensen–Shannon
``log(2u/(1 + u))``; α-divergence ``(1 − u^(−α))/α``.  The paper's JS
generator is ``u log u − (u+1) log((u+1)/2)``, twice the registry's ``jsd``
at β = 0.5; we keep the paper's scale so that ``--beta`` means what it means
there, and for a general registry β use ``log(u / (β + (1 − β)u))``, which is
the registry generator's derivative divided by ``1 − β``.

TRL's ``DPOTrainer(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=a)``
scores ``u^(a−1)/(a−1)``; with ``a = 1 − α`` that is ``−u^(−α)/α``, our f′
up to the constant ``1/α``, which cancels in the chosen − rejected difference:
TRL's ``a`` is ``1 −`` our α.
The implicit reward of a response is ``β f′(u)``; accuracy is the share of
pairs whose chosen reward is the larger.  The rewards are reported as
``β (f′(u) − f′(1))``, zero where the policy is the reference whatever the
divergence (f′(1) is 1 for reverse KL, −1 for forward KL, 0 for the others),
so that reverse KL reports TRL's DPO rewards ``β log u``; the constant
cancels in the loss and the margin.

With ``nll_coef`` α > 0 the loss is Iterative RPO's DPO+NLL (Pang et al. 2024, arXiv 2404.19733, Eq. 1), the
f-DPO term plus the chosen response's negative log-likelihood per token,

    L = −log σ(β f′(u_w) − β f′(u_l)) − α log π_θ(y_w|x) / |y_w|,

averaged over pairs (the paper uses α = 1; without it, on correct-vs-incorrect pairs of the policy's own
samples, DPO lowers the chosen responses' likelihood along with the rejected ones').  TRL's ``rpo_alpha``
adds the same term but averages over all chosen tokens of the batch rather than per response.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fdivctl.divergences import Divergence

FDPO_DIVERGENCES = ("rkl", "fkl", "jsd", "alpha")


def fprime(divergence: Divergence, log_u: torch.Tensor) -> torch.Tensor:
    """``f′(u)`` of the f-DPO paper's Table 1, from ``log u``."""
    name = divergence.name
    if name == "rkl":
        return log_u + 1.0
    if name == "fkl":
        return -torch.exp(-log_u)
    if name == "jsd":
        beta = divergence.params["beta"]
        return log_u - torch.logaddexp(torch.full_like(log_u, math.log(beta)), math.log1p(-beta) + log_u)
    if name == "alpha":
        alpha = divergence.params["alpha"]
        return -torch.expm1(-alpha * log_u) / alpha
    raise ValueError(f"f-DPO takes {', '.join(FDPO_DIVERGENCES)}; got {name}")


def fdpo_loss(
    divergence: Divergence,
    beta: float,
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    chosen_tokens: torch.Tensor | None = None,
    nll_coef: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """Mean loss over pairs ``[P]`` (sequence log-probs) and its figures: reward accuracy and margin; with the
    chosen responses' lengths ``chosen_tokens`` also their per-token NLL ``chosen_nll``, which ``nll_coef`` α
    adds to the loss (RPO's DPO+NLL)."""
    if nll_coef and chosen_tokens is None:
        raise ValueError("the NLL term needs the chosen responses' lengths")
    chosen = beta * fprime(divergence, chosen_logp - ref_chosen_logp)
    rejected = beta * fprime(divergence, rejected_logp - ref_rejected_logp)
    margin = chosen - rejected
    preference = -F.logsigmoid(margin).mean()
    chosen_nll = None if chosen_tokens is None else (-chosen_logp / chosen_tokens).mean()
    loss = preference + nll_coef * chosen_nll if nll_coef else preference
    at_reference = beta * float(fprime(divergence, torch.zeros(())))
    figures = {
        "loss": float(loss.detach()),
        "reward_accuracy": float((margin > 0).float().mean()),
        "reward_margin": float(margin.detach().mean()),
        "chosen_reward": float(chosen.detach().mean() - at_reference),
        "rejected_reward": float(rejected.detach().mean() - at_reference),
    }
    if chosen_nll is not None:
        figures["chosen_nll"] = float(chosen_nll.detach())
    if nll_coef:
        figures["preference_loss"] = float(preference.detach())
    return loss, figures
