"""A coefficient annealed linearly over training: ``c(s) = c₀ + (c₁ − c₀) · min(1, s)``, ``s`` the share done.

KDRL anneals its KD coefficient from 5e-3 to 1e-3 over training (seed:
"KDRL: Post-Training Reasoning LLMs via Unified Knowledge Distillation and
Reinforcement Learning"; METHODS.md §2.1).  The paper's decay curve is not
restated in METHODS.md; a linear decay over the run's schedule (optimizer steps
for staged runs, iterations online) is used and logged as ``kd_coef``.
"""

from __future__ import annotations


def linear_anneal(start: float, end: float | None, progress: float) -> float:
    """``start`` when ``end`` is None, else the linear interpolation at ``progress`` ∈ [0, 1] (clamped)."""
    if end is None:
        return start
    return start + (end - start) * min(1.0, max(0.0, progress))
