"""On-policy distillation (OPD) as a policy gradient, with vOPD's control-variate baseline.

The student q_θ samples y_t ~ q(·|s_t) at the distillation temperature; the
teacher p scores the sampled tokens.  Per token the reward is the negative
log-ratio (METHODS.md §2.2):

    r_t = log p(y_t|s_t) − log q(y_t|s_t),      E_{y_t~q}[r_t] = −KL(q(·|s_t) ‖ p(·|s_t))

and the loss is the REINFORCE surrogate ``L = −(1/N) Σ_t A_t log q(y_t|s_t)``
with ``A_t`` detached.  Since ``E_q[∇ log q] = 0``, ``E[∇L] = ∇ (1/N) Σ_t
KL(q_t‖p_t)`` at the sampled states: the per-token reverse KL (immediate
reward, no credit to later tokens).

Baselines (``baseline``):

* ``none``: ``A_t = r_t``.
* ``vopd`` (seed: "KL for a KL: On-Policy Distillation with Control Variate
  Baseline"): ``V_t = −KL(q_t‖p_t)``, the expected reward at s_t, computed in
  closed form and detached; ``A_t = r_t − V_t = r_t + KL_t``.  V_t depends
  only on the state, so the expected gradient is unchanged and its variance
  drops (``tests/test_distill_on_policy.py`` measures both).  The KL is over the full
  vocabulary (the teacher's logits are made chunk by chunk by the engine,
  fused with the student's pass), or with ``baseline_topk`` over the
  teacher's top-k ids plus one tail bucket — still a function of the state
  only, so still unbiased.

METHODS.md writes ``A_t = r_t − V_t = r_t + KL_t`` as "our reading"; this is
what we implement.
"""

from __future__ import annotations

import torch

from fdivctl import engine

BASELINES = ("none", "vopd")


def opd_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    token_ids: torch.Tensor,
    teacher_logprob: torch.Tensor,
    baseline_target: engine.Target | None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """The OPD surrogate of one batch of sampled tokens and its parts (for logging); ``softcap``: the student
    head's logit soft cap (the engine's ``softcap``).

    ``teacher_logprob`` ``[N]``: ``log p(y_t)`` at ``temperature``;
    ``baseline_target``: the teacher as an engine target for vOPD's KL, or
    None for no baseline.
    """
    n_tokens = token_ids.numel()
    baseline = baseline_target is not None
    # per chunk, read once after the pass
    sums: dict[str, list[torch.Tensor]] = {"reward": [], "kl": [], "advantage_sq": []}

    def objective(chunk: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
        logprob = chunk["logprob"]
        reward = teacher_logprob[rows] - logprob.detach()
        advantage = reward
        sums["reward"].append(reward.sum().double())
        if baseline:
            kl = chunk["divergence"].detach()
            advantage = reward + kl
            sums["kl"].append(kl.sum().double())
        sums["advantage_sq"].append(advantage.double().square().sum())
        return -(advantage * logprob).sum() / n_tokens

    loss, _ = engine.token_loss(
        hidden, head_weight, objective, bias=head_bias, token_ids=token_ids,
        target=baseline_target, divergence="rkl" if baseline else None, temperature=temperature,
        chunk_size=chunk_size, softcap=softcap,
    )
    count = max(1, n_tokens)
    figures = {"tokens": float(n_tokens), "loss": float(loss.detach()),
               "opd_reward": float(sum(sums["reward"])) / count,
               # √(mean A_t²) over the micro-batch's tokens (the step logs its mean over micro-batches): the
               # REINFORCE gradient's noise grows with A's second moment, mean included, which a baseline shrinks
               "advantage_rms": (float(sum(sums["advantage_sq"])) / count) ** 0.5}
    if baseline:
        figures["rkl"] = float(sum(sums["kl"])) / count
    return loss, figures
