"""The GRPO family's pieces: group advantages, reward shaping, the clipped surrogate, loss aggregation.

For a prompt with a group of G sampled responses o_1..o_G and rewards r_i
(Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, Eq. 3):

    A_i = (r_i − mean_j r_j) / (std_j r_j + ε)        (std with Bessel's correction, ε = 1e-6)

Dr.GRPO (Liu et al. 2025, arXiv 2503.20783, §3.1) drops the std division
(``std_norm=False``) and the per-response length normalisation
(``seq-mean-token-sum``).  Per token t of response i, with the importance
ratio ρ_it = π_θ(o_it) / π_old(o_it), the PPO-clip surrogate with DAPO's
decoupled bounds (Yu et al. 2025, arXiv 2503.14476, Eq. 10 "clip-higher"):

    L_it = −min(ρ_it A_i, clip(ρ_it, 1 − ε_low, 1 + ε_high) A_i)

Aggregation over a minibatch of B responses with |o_i| tokens each (verl's
``loss_agg_mode``): ``token-mean`` Σ_it L_it / Σ_i |o_i| (DAPO, Eq. 12);
``seq-mean-token-mean`` (1/B) Σ_i (1/|o_i|) Σ_t L_it (GRPO);
``seq-mean-token-sum`` (1/B) Σ_i Σ_t L_it (Dr.GRPO).  :func:`token_weights`
turns the choice into one weight per token so micro-batches add up exactly.

DAPO's dynamic sampling drops groups whose rewards are all equal (their
advantages are 0); its soft overlong punishment (Eq. 13) is :func:`overlong_penalty`.
"""

from __future__ import annotations

import torch

LOSS_AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
ADVANTAGE_EPS = 1e-6


def group_sum(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``Σ values`` per group id (``groups`` int64 ``[S]``, ids 0..G−1), as float64 ``[G]``."""
    n_groups = int(groups.max()) + 1 if groups.numel() else 0
    return torch.zeros(n_groups, dtype=torch.float64).index_add_(0, groups, values.double())


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, std_norm: bool = True) -> torch.Tensor:
    """``A_i`` for rewards ``[S]`` with group ids ``[S]`` (int64, 0..G−1); a group of one gets 0."""
    rewards = rewards.double()
    count = group_sum(torch.ones_like(rewards), groups)
    mean = group_sum(rewards, groups) / count
    centred = rewards - mean[groups]
    if not std_norm:
        return centred.float()
    squares = group_sum(centred.square(), groups)
    std = (squares / (count - 1).clamp(min=1)).sqrt()
    return (centred / (std[groups] + ADVANTAGE_EPS)).float()


def equal_reward_groups(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``[S]`` bool: True for responses whose group has all-equal rewards (DAPO dynamic sampling drops them)."""
    n_groups = int(groups.max()) + 1 if groups.numel() else 0
    high = torch.full((n_groups,), -torch.inf, dtype=rewards.dtype).scatter_reduce(0, groups, rewards, "amax")
    low = torch.full((n_groups,), torch.inf, dtype=rewards.dtype).scatter_reduce(0, groups, rewards, "amin")
    return (high == low)[groups]


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, Eq. 13), added to the reward.

    0 up to ``max_length − buffer`` tokens, then falling linearly to −1 at
    ``max_length``, and −1 beyond.
    """
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32)
    start = max_length - buffer
    return ((start - lengths.float()) / buffer).clamp(min=-1.0, max=0.0)


#: |log π − log π_old| beyond which the ratio is held at e^±20, so that one token cannot overflow
LOG_RATIO_BOUND = 20.0


def importance_ratio(logprob: torch.Tensor, old_logprob: torch.Tensor) -> torch.Tensor:
    """``π/π_old = exp(log π − log π_old)``, the log-ratio clamped to ±:data:`LOG_RATIO_BOUND`."""
    return torch.exp((logprob - old_logprob).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))


def truncated_importance_weights(trainer_logprob: torch.Tensor, sampler_logprob: torch.Tensor,
                                 cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TIS (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"): each
    token's weight ``min(π_old(y)/π_sampler(y), C)`` for a sampler whose probabilities differ from the trainer's,
    and the bool mask of the tokens the cap truncated."""
    ratio = importance_ratio(trainer_logprob, sampler_logprob)
    return ratio.clamp(max=cap), ratio > cap


def clipped_surrogate(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantage: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``L_it`` and a bool mask of the tokens where the clipped branch is the one taken.

    Differentiable in ``logprob`` (and ``old_logprob``); the advantages are constants.  The gradient is the
    closed form of :class:`_ClippedSurrogate`, one multiplication in the backward pass where autograd through
    ``exp``, two ``clamp`` and ``minimum`` takes ~30 operations: the RL loss runs it once per head chunk, and on
    a GPU each of those operations is a kernel launch.
    """
    if advantage.requires_grad:
        raise ValueError("clipped_surrogate: the advantages are constants; detach them")
    loss, taken = _ClippedSurrogate.apply(logprob, old_logprob, advantage, float(clip_low), float(clip_high))
    return loss, taken


class _ClippedSurrogate(torch.autograd.Function):
    """``L = −min(ρA, clip(ρ, 1 − ε_low, 1 + ε_high) A)`` with ``ρ = exp(clamp(x, ±B))``, ``x = log π − log π_old``.

    ``∂L/∂log π = −ρA`` where the unclipped branch is the minimum (``ρA ≤ clip(ρ)A``) and ``|x| ≤ B``, else 0
    (the PPO-clip gradient: Schulman et al. 2017, arXiv 1707.06347, Eq. 7); ``∂L/∂log π_old`` is its negative.
    This equals autograd's gradient of the same expression: where the two branches tie, ρ lies inside the clip
    range (both branches' gradients are ρA, which ``minimum`` splits in halves) or A = 0 (both are 0); at the
    bounds of the clamps autograd passes the gradient, as here.
    """

    @staticmethod
    def forward(ctx, logprob, old_logprob, advantage, clip_low, clip_high):
        log_ratio = logprob - old_logprob
        held = log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        ratio = torch.exp(held)
        unclipped = ratio * advantage
        clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantage
        taken = clipped < unclipped
        # held != log_ratio: beyond the bounds (or NaN), where the clamp passes no gradient
        slope = (-unclipped).masked_fill_(taken | (held != log_ratio), 0.0)
        ctx.save_for_backward(slope)
        ctx.mark_non_differentiable(taken)
        ctx.set_materialize_grads(False)
        return -torch.minimum(unclipped, clipped), taken

    @staticmethod
    def backward(ctx, grad_loss, _grad_taken):
        if grad_loss is None:
            return None, None, None, None, None
        (slope,) = ctx.saved_tensors
        grad = grad_loss * slope
        return (grad if ctx.needs_input_grad[0] else None, -grad if ctx.needs_input_grad[1] else None,
                None, None, None)


def token_weights(lengths: torch.Tensor, n_tokens: int, n_sequences: int, agg: str) -> torch.Tensor:
    """One weight per token of the responses with ``lengths`` (a micro-batch), for a minibatch of
    ``n_tokens`` tokens in ``n_sequences`` responses, so that ``Σ w L`` over the minibatch is the aggregate."""
    if agg not in LOSS_AGGS:
        raise ValueError(f"loss aggregation {agg!r}; valid: {', '.join(LOSS_AGGS)}")
    lengths = lengths.long()
    if agg == "token-mean":
        per_sequence = torch.full(lengths.shape, 1.0 / n_tokens)
    elif agg == "seq-mean-token-sum":
        per_sequence = torch.full(lengths.shape, 1.0 / n_sequences)
    else:
        per_sequence = 1.0 / (n_sequences * lengths.clamp(min=1).double())
    return per_sequence.float().repeat_interleave(lengths)
