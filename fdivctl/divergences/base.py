"""The divergence interface every registry entry implements.

An f-divergence between a reference/teacher distribution ``p`` and the model
``q`` is ``D_f(q‖p) = Σ_i p_i f(q_i / p_i)`` with ``f`` convex and ``f(1) = 0``
(Csiszár 1967; Ali & Silvey 1966).  Each entry supplies two views of the same
quantity:

* :meth:`Divergence.pointwise` — the summand ``p_i f(q_i/p_i)`` written
  stably in terms of ``log q_i`` and ``log p_i``.  Summing it over a support
  gives the closed form on categorical distributions; summing it over top-k
  buckets gives the sparse form.  Every summand is non-negative for
  normalised inputs only after summation, so callers always sum.
* :meth:`Divergence.generator` — ``f(u)`` for ``u = exp(log_ratio)``, used on
  samples drawn from the reference (DPH-RL, arXiv 2509.07430, §3).

``token_divergence`` evaluates the full-vocabulary closed form from two logit
tensors; :meth:`reference_sample_loss` is the control-variate generator form
``f(u) − f′(1)(u − 1)`` whose expectation under ``p`` equals ``D_f`` because
``E_p[u] = 1``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from fdivctl.divergences.logspace import compute_dtype, floor_log

# log u is clamped to this range before exponentiating in sample estimators
# (peers' NaN reports: exp of a large log-ratio overflows fp32).
LOG_RATIO_CLAMP = 20.0


class Divergence(ABC):
    """One entry of the registry: a divergence ``D(q‖p)`` between model ``q`` and target ``p``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    #: f′(1): the coefficient of the control variate ``u − 1`` in :meth:`reference_sample_loss`.
    fprime_at_one: ClassVar[float] = 0.0

    @property
    def params(self) -> dict[str, float]:
        """The entry's parameters (e.g. ``{"beta": 0.5}``); empty when it has none."""
        return {}

    @abstractmethod
    def pointwise(self, log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        """The summand ``p_i f(q_i/p_i)`` for each support element (same shape as the inputs)."""

    @abstractmethod
    def generator(self, log_ratio: torch.Tensor) -> torch.Tensor:
        """``f(u)`` elementwise, for ``u = exp(log_ratio) = q/p``."""

    def fprime(self, log_ratio: torch.Tensor) -> torch.Tensor:
        """``f′(u)`` elementwise at ``u = exp(log_ratio)``, from :meth:`generator` by autograd:
        ``f′(u) = (d f(e^l)/dl)·e^{−l}``.  Differentiable in ``log_ratio`` when it requires grad."""
        with torch.enable_grad():
            graph = log_ratio.requires_grad
            log_u = log_ratio if graph else log_ratio.detach().requires_grad_(True)
            (slope,) = torch.autograd.grad(self.generator(log_u).sum(), log_u, create_graph=graph)
        return slope * torch.exp(-(log_u if graph else log_u.detach()))

    def support_divergence(self, log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        """``Σ_i p_i f(q_i/p_i)`` over the last dimension of two aligned log-probability tensors.

        Both inputs must be finite (``-inf`` floored by :func:`floor_log`); the
        engine guarantees it without copies, :meth:`token_divergence` floors.
        """
        return self.pointwise(log_q, log_p).sum(dim=-1)

    def token_divergence(
        self,
        student_logits: torch.Tensor,
        target_logits: torch.Tensor,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Closed form over the full vocabulary, one value per token.

        ``q = softmax(student_logits / T)``, ``p = softmax(target_logits / T)``,
        both computed with log-softmax in at least fp32.  Inputs are ``[..., V]``;
        the result is ``[...]``.
        """
        if student_logits.shape != target_logits.shape:
            raise ValueError(
                f"student_logits {tuple(student_logits.shape)} and target_logits "
                f"{tuple(target_logits.shape)} must have the same shape [..., V]"
            )
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        dtype = compute_dtype(student_logits, target_logits)
        log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
        log_p = torch.log_softmax(target_logits.to(dtype) / temperature, dim=-1)
        return self.support_divergence(floor_log(log_q), floor_log(log_p))

    def reference_sample_loss(
        self, log_ratio: torch.Tensor, clamp: float = LOG_RATIO_CLAMP
    ) -> torch.Tensor:
        """Single-sample estimate of ``D_f(q‖p)`` on a token drawn from ``p``.

        ``f(u) − f′(1)(u − 1)`` with ``u = exp(clamp(log q − log p))``.  Since
        ``E_p[u − 1] = 0`` the expectation is unchanged, and because the result
        has zero slope at ``u = 1`` it carries its own control variate: for
        forward KL it is the low-variance k3 shape ``u − 1 − log u`` that
        DPH-RL uses (arXiv 2509.07430, Eq. 6; METHODS.md §1).
        """
        log_ratio = log_ratio.clamp(-clamp, clamp)
        value = self.generator(log_ratio)
        if self.fprime_at_one:
            value = value - self.fprime_at_one * torch.expm1(log_ratio)
        return value

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}({args})"


def check_open_unit(name: str, value: float, entry: str) -> float:
    """Return ``value`` as float if it lies strictly inside (0, 1), else raise ValueError."""
    value = float(value)
    if not (0.0 < value < 1.0) or math.isnan(value):
        raise ValueError(f"{entry}: {name} must lie in the open interval (0, 1), got {value}")
    return value
