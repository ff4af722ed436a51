"""TCOD's temporal curriculum: how many turns of a multi-turn trajectory the loss sees at a step.

Source: seed "TCOD: Exploring Temporal Curriculum in On-Policy Distillation"
(METHODS.md §2.2): the trajectory depth exposed to the distillation loss grows
from short to long.  Our schedule is linear in the optimizer step:

    d(s) = d₀ + ⌊(D − d₀ + 1) · s / S_w⌋  (capped at D),

with d₀ = ``--depth-start`` turns, S_w = ``--depth-warmup`` steps and D the
deepest trajectory of the data; tokens of turn index ≥ d(s) (0-based) carry
no weight.  After S_w steps every turn is seen.  The paper's exact pacing
function is not restated in METHODS.md.

Turns come from a ``turn_ids`` column, or from the chat template
(:func:`turns_from_chat_template`): turn t is everything after the t-th
assistant header the template writes (the header itself included).
"""

from __future__ import annotations

import numpy as np


def exposed_turns(step: int, start: int, warmup: int, max_turns: int) -> int:
    """The number of turns the loss sees at optimizer step ``step`` (0-based)."""
    if start < 1 or warmup < 1:
        raise ValueError(f"--depth-start and --depth-warmup must be ≥ 1, got {start}, {warmup}")
    if step >= warmup or start >= max_turns:
        return max(max_turns, start)
    return min(max_turns, start + (max_turns - start + 1) * step // warmup)


def assistant_header(tokenizer) -> list[int]:
    """The token ids the chat template writes to open an assistant turn (its generation prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: give each completion token's turn in a turn_ids column")
    messages = [{"role": "user", "content": "x"}]
    try:
        bare = tokenizer.apply_chat_template(messages, tokenize=False)
        opened = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # noqa: BLE001 — jinja2's TemplateError, or what the template's own code raises
        raise ValueError(f"the chat template refused a one-message conversation ({type(err).__name__}: {err})") \
            from None
    if not opened.startswith(bare) or opened == bare:
        raise ValueError("the chat template writes no separate assistant header: give a turn_ids column")
    return tokenizer.encode(opened[len(bare):], add_special_tokens=False)


def turns_from_chat_template(completions: list[np.ndarray], header: list[int]) -> list[np.ndarray]:
    """Each completion token's 0-based turn: the number of assistant headers that start at or before it.

    The completion follows the prompt's own header, so its first tokens are turn 0.
    """
    width = len(header)
    pattern = np.asarray(header, dtype=np.int64)
    turns = []
    for tokens in completions:
        starts = np.zeros(len(tokens), dtype=np.int64)
        if width and len(tokens) >= width:
            windows = np.lib.stride_tricks.sliding_window_view(tokens, width)
            starts[np.flatnonzero((windows == pattern).all(axis=1))] = 1
        turns.append(np.cumsum(starts))
    return turns
