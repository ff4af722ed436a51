"""TCOD's temporal curriculum: how many turns of a multi-turn trajectory the loss sees at a step.

Source: seed "TCOD: Exploring Temporal Curriculum in On-Policy Distillation"
(METHODS.md §2.2): the trajectory depth exposed to the distillation loss grows
from short to long.  Our schedule is linear in the optimizer step:

    d(s) = d₀ + ⌊(D − d₀ + 1) · s / S_w⌋  (capped at D),

with d₀ = ``--depth-start`` turns, S_w = ``--depth-warmup`` steps and D the
deepest trajectory of the data; tokens of turn index ≥ d(s) (0-based) carry
no weight.  After S_w steps every turn is seen.  The paper's exact pacing
function is not restated in METHODS.md.
"""

from __future__ import annotations


def exposed_turns(step: int, start: int, warmup: int, max_turns: int) -> int:
    """The number of turns the loss sees at optimizer step ``step`` (0-based)."""
    if start < 1 or warmup < 1:
        raise ValueError(f"--depth-start and --depth-warmup must be ≥ 1, got {start}, {warmup}")
    if step >= warmup or start >= max_turns:
        return max(max_turns, start)
    return min(max_turns, start + (max_turns - start + 1) * step // warmup)
