"""f-divergence SFT: supervised fine-tuning on demonstrations whose objective keeps the reference term.

Seed: Wang et al. 2025, "Implicit Reward as the Bridge: A Unified View of
SFT and DPO Connections" (arXiv 2507.00018; METHODS.md §2.1): SFT is
implicit-reward learning whose KL term is constant in the policy, and other
f-divergences give SFT objectives that keep that term.  The paper's formulas
were not readable here; this is our derivation of that statement, per token.

With the implicit reward of the f-regularized objective
``max_π E_π[r] − D_f(π‖π_ref)`` (D_f(π‖π_ref) = Σ_v π_ref f(π/π_ref), the
registry's D(q‖p) with q = π, p = π_ref), ``r = f′(u) + λ`` for
``u = π/π_ref``.  Learning r from demonstrations as in inverse RL (maximize
the data's reward minus the best regularized value any policy reaches)
gives, per demonstrated token y_t of prefix s_t and
u_v = π_θ(v|s_t)/π_ref(v|s_t) (λ cancels):

    J_t = f′(u_y) − Σ_v π_ref(v) f*(f′(u_v)),      f*(f′(u)) = u f′(u) − f(u)

the Fenchel lower bound ``E_P[T] − E_Q[f*(T)] ≤ D_f(P‖Q)`` of the data P
against π_ref at ``T = f′(π_θ/π_ref)``, tight at π_θ = P.  The loss is
``ℓ_t = −J_t = −f′(u_y) + Σ_v q_v f′(u_v) − D(q‖p)`` (q = π_θ, p = π_ref),
computed over the whole vocabulary.

* reverse KL (f = u log u): f′ = log u + 1 and Σ_v π_ref f*(f′(u_v)) = Σ_v π_θ(v) = 1, the constant the paper
  points at: ``ℓ_t = −log π_θ(y_t) + log π_ref(y_t)``, plain SFT;
* any other f keeps the sum: the push on y_t,
  ``−∂ℓ/∂log π_θ(y_t) = u_y f″(u_y)(1 − π_θ(y_t))`` (SFT: 1 − π_θ(y_t)), fades as
  π_θ(y_t) grows past π_ref(y_t) (squared Hellinger: ``u f″(u) = ¼ √(π_ref(y)/π_θ(y))``),
  so the reference bounds the update.

A divergence with ``f(0) = ∞`` (forward KL, f = −log u) makes ``D_f(P‖π_ref)``
infinite for one-hot demonstrations and the loss unbounded below: refused.

``Σ_v q_v f′(u_v)`` is ``Σ_v ∂D/∂log q_v`` of the registry's stable summands
(autograd with a graph, so the loss stays differentiable) in the engine's
dtype, and ``f′(u_y)`` comes from the generator (:meth:`Divergence.fprime`) in
float64 for the ``[c]`` demonstrated tokens alone.
"""

from __future__ import annotations

import torch

from fdivctl.divergences import Divergence
from fdivctl.engine.chunk_loss import ChunkLoss
from fdivctl.engine.targets import Target, TopK

#: f(0⁺) above this (the generator at log u = −1000) counts as infinite
F_AT_ZERO_LIMIT = 100.0


class FDivergenceSFT(ChunkLoss):
    """``ℓ_t = −f′(u_y) + Σ_v q_v f′(u_v) − D(q‖p)`` for the demonstrated tokens (:meth:`bind`); p: the
    reference."""

    name = "sft"

    def __init__(self, divergence: Divergence, token_ids: torch.Tensor | None = None):
        at_zero = float(divergence.generator(torch.tensor(-1000.0, dtype=torch.float64)))
        if not at_zero < F_AT_ZERO_LIMIT:
            raise ValueError(f"sft-{divergence.name}: f(0) = ∞, so the objective is unbounded below on "
                             "demonstrations (D_f(data‖reference) is infinite); use rkl (plain SFT), jsd, "
                             "hellinger, tv or alpha with 0 < α < 1")
        self.divergence, self.token_ids = divergence, token_ids

    def bind(self, token_ids: torch.Tensor, teacher_token_logprob: torch.Tensor | None = None) -> FDivergenceSFT:
        return FDivergenceSFT(self.divergence, token_ids)

    def take(self, index):
        return FDivergenceSFT(self.divergence, self.token_ids[index])

    def validate(self, n_tokens, target):
        if self.token_ids is None or tuple(self.token_ids.shape) != (n_tokens,):
            raise ValueError(f"{self!r} needs the {n_tokens} demonstrated tokens: bind(token_ids)")
        if isinstance(target, TopK):
            raise ValueError(f"{self!r} sums over the reference's whole vocabulary: give the reference model "
                             "(--teacher / --ref-model), not a top-k store")

    def chunk_values(self, log_q, target: Target, rows, temperature):
        _, log_p = target.support(rows, log_q, temperature)  # full vocabulary, aligned with log_q
        log_p = log_p.detach()
        graph = log_q.requires_grad  # False in a pass without gradients (evaluation): the value alone
        with torch.enable_grad():
            lq = log_q if graph else log_q.detach().requires_grad_(True)
            divergence = self.divergence.support_divergence(lq, log_p)
            (q_fprime,) = torch.autograd.grad(divergence.sum(), lq, create_graph=graph)  # q_v f′(u_v)
        y = self.token_ids[rows].long().unsqueeze(-1)
        log_u_y = (lq.gather(-1, y) - log_p.gather(-1, y)).squeeze(-1)
        fprime_y = self.divergence.fprime((log_u_y if graph else log_u_y.detach()).double())
        value = -fprime_y.to(lq.dtype) + q_fprime.sum(-1) - divergence
        return value if graph else value.detach()

    def __repr__(self) -> str:
        return f"sft-{self.divergence!r}"
