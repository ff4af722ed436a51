"""PACED prompt weights: ``w(p) ∝ p^α (1 − p)^β`` from the student's pass rate p on the prompt.

Source: seed "PACED: Distillation at the Frontier of Student Competence"
(METHODS.md §2.2): a Beta kernel in the pass rate, default α = β = 1, i.e.
``p(1 − p)`` — prompts the student solves sometimes weigh most, prompts it
always or never solves weigh nothing.  We divide by the kernel's maximum
(at ``p* = α/(α+β)``) so that a frontier prompt weighs 1 and the learning rate
keeps its meaning; the paper's normalization is not restated in METHODS.md.
"""

from __future__ import annotations

import torch


def paced_weights(pass_rate: torch.Tensor, alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """``p^α (1 − p)^β / max_p(·)`` per prompt; ``pass_rate`` in [0, 1]."""
    if not alpha > 0 or not beta > 0:
        raise ValueError(f"--paced-alpha and --paced-beta must be > 0, got {alpha}, {beta}")
    p = pass_rate.double()
    if bool(((p < 0) | (p > 1) | p.isnan()).any()):
        raise ValueError("pass rates must lie in [0, 1]")
    peak = alpha / (alpha + beta)
    top = peak**alpha * (1 - peak) ** beta
    return p**alpha * (1 - p) ** beta / top
