"""One pass over the tokens in chunks: the only place student logits exist.

For each chunk of rows the student logits ``z = h Wᵀ (+ b)`` ``[c, V]`` are
made in fp32, the requested per-token quantities are computed from
``log q = log_softmax(z / T)``:

* ``logprob``    — ``log q(y_t)`` of given token ids;
* ``entropy``    — ``H(q) = −Σ q log q``;
* ``divergence`` — ``D(q‖p)`` against the target, summed over its support;

and, when an objective is given — a sum over the chunk's tokens of any
function of their outputs, e.g. ``Σ_t Σ_k c_k[t] · out_k[t]`` for fixed
cotangents (:func:`linear_objective`) — its gradient ``∂/∂z`` is taken by
autograd on that chunk alone and pushed through the head into ``grad h``,
``grad W`` (fp32 accumulator) and ``grad b``; the objective's value is summed.  The chunk's ``[c, V]`` buffers are freed before the next
chunk, so peak memory is O(c·V + V·H) instead of O(N·V).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fdivctl.divergences import Divergence
from fdivctl.divergences.logspace import compute_dtype
from fdivctl.engine.matmul import backprop_linear, linear_fp32
from fdivctl.engine.targets import Target

OUTPUT_NAMES = ("logprob", "entropy", "divergence")

#: ``objective(outputs of a chunk's tokens, their rows) → scalar``; must be a sum over those tokens
Objective = Callable[[dict[str, torch.Tensor], slice], torch.Tensor]


def linear_objective(cotangents: dict[str, torch.Tensor]) -> Objective:
    """``Σ_t Σ_k c_k[t] · out_k[t]``: the vector–Jacobian product of fixed per-token cotangents."""
    return lambda chunk, rows: sum((chunk[k] * c[rows]).sum() for k, c in cotangents.items())


@dataclass
class SweepPlan:
    """What to compute per token; everything but the head's tensors."""

    token_ids: torch.Tensor | None
    entropy: bool
    target: Target | None
    divergence: Divergence | None
    temperature: float
    chunk_size: int

    @property
    def outputs(self) -> tuple[str, ...]:
        wanted = {
            "logprob": self.token_ids is not None,
            "entropy": self.entropy,
            "divergence": self.divergence is not None,
        }
        return tuple(name for name in OUTPUT_NAMES if wanted[name])


@dataclass
class SweepGrads:
    hidden: torch.Tensor | None
    weight: torch.Tensor | None  # fp32 accumulator
    bias: torch.Tensor | None  # fp32 accumulator


def chunk_outputs(plan: SweepPlan, logits: torch.Tensor, rows: slice) -> dict[str, torch.Tensor]:
    """The requested per-token quantities for one chunk of student logits (fp32, ``[c, V]``).

    The student's logits are finite (the head's inputs are checked), so its
    log-probs are finite too and need no floor.
    """
    if plan.temperature != 1.0:
        logits = logits / plan.temperature
    log_q = torch.log_softmax(logits, dim=-1)
    out: dict[str, torch.Tensor] = {}
    if plan.token_ids is not None:
        out["logprob"] = log_q.gather(-1, plan.token_ids[rows].long().unsqueeze(-1)).squeeze(-1)
    if plan.entropy:
        out["entropy"] = -(log_q.exp() * log_q).sum(-1)
    if plan.divergence is not None:
        log_q_s, log_p_s = plan.target.support(rows, log_q, plan.temperature)
        out["divergence"] = plan.divergence.support_divergence(log_q_s, log_p_s)
    return out


def sweep(
    hidden: torch.Tensor,
    weight_mm: torch.Tensor,
    bias: torch.Tensor | None,
    plan: SweepPlan,
    objective: Objective | None = None,
    needs: tuple[bool, bool, bool] = (False, False, False),
) -> tuple[dict[str, torch.Tensor], SweepGrads, torch.Tensor | None]:
    """Run the chunks; return per-token outputs ``[N]``, the gradients of ``objective`` (where
    ``needs`` asks for them: hidden, weight, bias) and its summed value (None without one)."""
    n = hidden.shape[0]
    acc = compute_dtype(hidden, weight_mm)
    outputs = {name: torch.empty(n, dtype=acc, device=hidden.device) for name in plan.outputs}
    with_grad = objective is not None and any(needs)
    grads = SweepGrads(
        hidden=torch.empty_like(hidden) if with_grad and needs[0] else None,
        weight=torch.zeros(weight_mm.shape, dtype=acc, device=hidden.device)
        if with_grad and needs[1]
        else None,
        bias=torch.zeros(weight_mm.shape[0], dtype=acc, device=hidden.device)
        if with_grad and needs[2]
        else None,
    )
    total = None if objective is None else torch.zeros((), dtype=acc, device=hidden.device)
    for start in range(0, n, plan.chunk_size):
        rows = slice(start, min(start + plan.chunk_size, n))
        h_chunk = hidden[rows]
        logits = linear_fp32(h_chunk, weight_mm, bias)
        if not with_grad:
            with torch.no_grad():
                chunk = chunk_outputs(plan, logits, rows)
                if objective is not None:
                    total += objective(chunk, rows)
        else:
            logits.requires_grad_(True)
            with torch.enable_grad():
                chunk = chunk_outputs(plan, logits, rows)
                value = objective(chunk, rows)
                (grad_logits,) = torch.autograd.grad(value, logits)
            total += value.detach()
            del logits
            grad_h = backprop_linear(
                grad_logits, h_chunk, weight_mm, grads.weight, grads.hidden is not None
            )
            if grad_h is not None:
                grads.hidden[rows] = grad_h
            if grads.bias is not None:
                grads.bias += grad_logits.sum(0)
        for name, value in chunk.items():
            outputs[name][rows] = value.detach()
    return outputs, grads, total
