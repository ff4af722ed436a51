"""Token-level knowledge distillation on fixed sequences.

For the scored tokens y_t of a batch (completion tokens, teacher-forced):

    L = mean_t D(q_θ(·|y_<t) ‖ p(·|y_<t))  +  λ_ce · mean_t −log q_θ(y_t|y_<t)

with D any registry divergence at temperature T (both sides divided by T;
Hinton et al. 2015), p the teacher's full distribution (online) or its stored
top-k + tail buckets (offline, DESIGN.md), and λ_ce the ``--mix-ce`` weight.
``loss="ce"`` is plain SFT on the same tokens.  ``D`` may also be one of the
non-f losses of :data:`CHUNK_LOSSES` (PLD, SinKD, BD-KD; each module states its
formula), or ``sft-D``, the f-divergence SFT loss with the teacher as reference
(:mod:`fdivctl.objectives.fsft`).  Everything goes through the chunked engine:
no ``[tokens, V]`` logits are held.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fdivctl import divergences, engine
from fdivctl.divergences import Divergence
from fdivctl.divergences.registry import split_spec
from fdivctl.objectives.bdkd import BalancedKL
from fdivctl.objectives.fsft import FDivergenceSFT
from fdivctl.objectives.pld import PlackettLuce
from fdivctl.objectives.sinkhorn import SinkhornDistance

#: the prefix of an f-divergence SFT loss spec: ``sft-`` and a registry divergence spec
SFT_PREFIX = "sft-"

#: distillation losses beyond the registry, by name: spec parameters are their constructor's keywords
CHUNK_LOSSES: dict[str, type[engine.ChunkLoss]] = {
    cls.name: cls for cls in (PlackettLuce, SinkhornDistance, BalancedKL)
}


def parse_loss(spec: str) -> Divergence | engine.ChunkLoss:
    """A registry divergence (``"jsd:beta=0.3"``), a chunk loss (``"pld"``, ``"sinkhorn:eps=0.05,iters=50"``,
    ``"bdkd:mu=3"``) or an f-divergence SFT loss against the teacher as reference (``"sft-jsd:beta=0.3"``,
    :mod:`fdivctl.objectives.fsft`); ValueError naming the valid names."""
    name, params = split_spec(spec)
    if name.startswith(SFT_PREFIX):
        return FDivergenceSFT(divergences.get(name.removeprefix(SFT_PREFIX), **params))
    if name not in CHUNK_LOSSES:
        try:
            return divergences.get(name, **params)
        except ValueError as err:
            if name in divergences.names():
                raise
            raise ValueError(f"{err}; distillation losses: {', '.join(CHUNK_LOSSES)}, sft-DIVERGENCE") from None
    if name == "pld" and params:
        raise ValueError("pld takes no parameters")
    integers = {"iters", "batch", "support_k"}
    try:
        return CHUNK_LOSSES[name](**{k: int(v) if k in integers else v for k, v in params.items()})
    except TypeError:
        raise ValueError(f"{name}: unknown parameter in {spec!r}") from None


@dataclass
class KDBatch:
    hidden: torch.Tensor  # student final hidden states at the predicting positions [N, H]
    token_ids: torch.Tensor  # the scored tokens [N]
    target: engine.Target | None  # None for loss="ce"
    teacher_token_logprob: torch.Tensor | None = None  # the store's exact log p(y_t) (PLD with a top-k store)
    weights: torch.Tensor | None = None  # per-token weights w_t [N] (PACED, TCOD); None: all 1


def kd_loss(
    batch: KDBatch,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    divergence: Divergence | engine.ChunkLoss | None,
    temperature: float = 1.0,
    mix_ce: float = 0.0,
    chunk_size: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """The distillation loss of one batch and its parts (for logging); ``chunk_size``: the engine's token rows per
    chunk (None: its default); ``softcap``: the student head's logit soft cap (the engine's ``softcap``).

    With per-token ``weights`` each term is ``Σ_t w_t ℓ_t / N``: a batch of
    low-weight tokens counts less than one of full-weight tokens.
    """
    n_tokens = batch.token_ids.numel()
    figures: dict[str, float] = {"tokens": float(n_tokens)}
    weights = batch.weights
    scale = 1.0 if weights is None else weights.sum() / max(1, n_tokens)
    loss = batch.hidden.new_zeros((), dtype=torch.float32)
    if isinstance(divergence, engine.ChunkLoss):
        divergence = divergence.bind(batch.token_ids, batch.teacher_token_logprob)
    if divergence is not None:
        div = scale * engine.divergence_loss(batch.hidden, head_weight, batch.target, divergence, bias=head_bias,
                                             weights=weights, temperature=temperature, chunk_size=chunk_size,
                                             softcap=softcap)
        figures[divergence.name] = float(div.detach())
        loss = loss + div
    if divergence is None or mix_ce:
        logprob = engine.token_outputs(batch.hidden, head_weight, bias=head_bias, token_ids=batch.token_ids,
                                       chunk_size=chunk_size, softcap=softcap).logprob
        ce = -(logprob if weights is None else logprob * weights).sum() / max(1, n_tokens)  # 0 for an empty batch
        figures["ce"] = float(ce.detach())
        loss = loss + (1.0 if divergence is None else mix_ce) * ce
    figures["loss"] = float(loss.detach())
    return loss, figures
