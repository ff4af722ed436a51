"""Token-level knowledge distillation on fixed sequences.

For the scored tokens y_t of a batch (completion tokens, teacher-forced):

    L = mean_t D(q_θ(·|y_<t) ‖ p(·|y_<t))  +  λ_ce · mean_t −log q_θ(y_t|y_<t)

with D any registry divergence at temperature T (both sides divided by T;
Hinton et al. 2015), p the teacher's full distribution (online) or its stored
top-k + tail buckets (offline, DESIGN.md), and λ_ce the ``--mix-ce`` weight.
``loss="ce"`` is plain SFT on the same tokens.  Everything goes through the
chunked engine: no ``[tokens, V]`` logits are held.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fdivctl import engine
from fdivctl.divergences import Divergence


@dataclass
class KDBatch:
    hidden: torch.Tensor  # student final hidden states at the predicting positions [N, H]
    token_ids: torch.Tensor  # the scored tokens [N]
    target: engine.Target | None  # None for loss="ce"


def kd_loss(
    batch: KDBatch,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    divergence: Divergence | None,
    temperature: float = 1.0,
    mix_ce: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """The distillation loss of one batch and its parts (for logging)."""
    figures: dict[str, float] = {"tokens": float(batch.token_ids.numel())}
    loss = batch.hidden.new_zeros((), dtype=torch.float32)
    if divergence is not None:
        div = engine.divergence_loss(batch.hidden, head_weight, batch.target, divergence, bias=head_bias,
                                     temperature=temperature)
        figures[divergence.name] = float(div.detach())
        loss = loss + div
    if divergence is None or mix_ce:
        logprob = engine.token_outputs(batch.hidden, head_weight, bias=head_bias, token_ids=batch.token_ids).logprob
        ce = -logprob.mean()
        figures["ce"] = float(ce.detach())
        loss = loss + (1.0 if divergence is None else mix_ce) * ce
    figures["loss"] = float(loss.detach())
    return loss, figures
