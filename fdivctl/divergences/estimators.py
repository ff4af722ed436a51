"""Single-sample estimators of ``KL(q‖p)`` on tokens drawn from the model ``q``.

With ``r = p(y)/q(y)`` for a sampled token ``y ~ q`` (Schulman, "Approximating
KL divergence", 2020):

* ``k1 = −log r``            unbiased, high variance, can be negative;
* ``k2 = ½ (log r)²``        biased, low variance, its gradient is the
  gradient of the true KL to first order (what KDRL reports best);
* ``k3 = (r − 1) − log r``   unbiased and non-negative (GRPO's "low_var_kl");
* ``abs = |log r|``;
* ``k3+``                    straight-through: the value of k3 with the
  gradient of k2 (verl's ``low_var_kl+``-style option).

``log r`` is clamped to ``[−clamp, clamp]`` before exponentiating, the fix for
the NaN reports in peers' trackers.  Direction (which divergence), estimator,
and placement (reward or loss) are independent choices (METHODS.md §1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fdivctl.divergences.base import LOG_RATIO_CLAMP, Divergence


def _k1(log_r: torch.Tensor) -> torch.Tensor:
    return -log_r


def _k2(log_r: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_r.square()


def _k3(log_r: torch.Tensor) -> torch.Tensor:
    return log_r.expm1() - log_r


def _abs(log_r: torch.Tensor) -> torch.Tensor:
    return log_r.abs()


def _k3_straight_through(log_r: torch.Tensor) -> torch.Tensor:
    k2 = _k2(log_r)
    return k2 + (_k3(log_r) - k2).detach()


_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "k1": _k1,
    "k2": _k2,
    "k3": _k3,
    "abs": _abs,
    "k3+": _k3_straight_through,
}


def estimator_names() -> list[str]:
    """The valid estimator names, in documentation order."""
    return list(_ESTIMATORS)


def sample_kl(
    log_q: torch.Tensor,
    log_p: torch.Tensor,
    estimator: str = "k3",
    clamp: float = LOG_RATIO_CLAMP,
) -> torch.Tensor:
    """Per-token estimate of ``KL(q‖p)`` from the log-probs of tokens sampled from ``q``.

    ``log_q`` (model, differentiable) and ``log_p`` (reference) have the same
    shape; the result has that shape too.
    """
    if estimator not in _ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(_ESTIMATORS)}")
    if log_q.shape != log_p.shape:
        raise ValueError(
            f"log_q {tuple(log_q.shape)} and log_p {tuple(log_p.shape)} must have the same shape"
        )
    log_r = (log_p - log_q).clamp(-clamp, clamp)
    return _ESTIMATORS[estimator](log_r)


def sample_divergence(
    divergence: Divergence,
    log_q: torch.Tensor,
    log_p: torch.Tensor,
    estimator: str = "k3",
    clamp: float = LOG_RATIO_CLAMP,
) -> torch.Tensor:
    """Per-token estimate of ``D_f(q‖p) = E_p[f(q/p)]`` from tokens sampled from the model ``q``.

    Importance-weighting the generator, ``E_p[f(u)] = E_q[f(u)/u]`` with
    ``u = q/p``, gives for any registry entry

    * ``k1``: ``f(u)/u`` — for reverse KL (``f = u log u``) this is ``log u``, Schulman's k1;
    * ``k3``: ``(f(u) − f′(1)(u − 1))/u`` — unbiased too, since ``E_q[(u − 1)/u] = 0``,
      and for reverse KL it is ``r − 1 − log r`` with ``r = 1/u``, Schulman's k3.

    ``k2``, ``abs`` and ``k3+`` are defined for reverse KL only (:func:`sample_kl`).
    """
    if divergence.name == "rkl":
        return sample_kl(log_q, log_p, estimator, clamp)
    if estimator not in ("k1", "k3"):
        raise ValueError(f"estimator {estimator!r} is defined for rkl only; {divergence.name} takes k1, k3 or full")
    if log_q.shape != log_p.shape:
        raise ValueError(f"log_q {tuple(log_q.shape)} and log_p {tuple(log_p.shape)} must have the same shape")
    log_u = (log_q - log_p).clamp(-clamp, clamp)
    value = divergence.generator(log_u) if estimator == "k1" else divergence.reference_sample_loss(log_u, clamp)
    return value * torch.exp(-log_u)
