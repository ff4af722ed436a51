"""Numerically safe log-space helpers shared by every divergence.

A log-probability of exactly ``-inf`` (a padded vocabulary entry, an empty
tail bucket) would turn ``0 · log 0`` into NaN in values and gradients.  We
replace it by :data:`LOG_FLOOR`, a finite number whose exponential is exactly
zero in fp32 and fp64, so that every term ``p · g(p, q)`` with ``p = 0`` is an
exact zero with a zero gradient (DESIGN.md, "guard 0·log 0").
"""

import math

import torch

LOG_FLOOR = -1.0e30


def floor_log(log_x: torch.Tensor) -> torch.Tensor:
    """``log_x`` with ``-inf`` (and anything below the floor) replaced by :data:`LOG_FLOOR`."""
    return log_x.clamp_min(LOG_FLOOR)


def log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """``log(w·a + (1−w)·b)`` from ``log a`` and ``log b``, by logsumexp.

    ``weight_a`` must lie in [0, 1]; the end points return the pure component.
    """
    if weight_a <= 0.0:
        return log_b
    if weight_a >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when any input is fp64: losses accumulate in at least fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
