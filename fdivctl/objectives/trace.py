"""TRACE: token-routed self on-policy alignment — KL to a (privileged) teacher on annotated spans, GRPO elsewhere.

Source: Wang et al. 2026, "TRACE: Distilling Where It Matters via Token-Routed
Self On-Policy Alignment" (arXiv 2605.10194; METHODS.md §2.1).  Each rollout
carries annotated spans ``(start, end, kind)`` of completion tokens
``[start, end)``, ``kind ∈ {key, error}``.  Token t of a response is routed:

* ``m_t = 1`` (forward KL) if it lies in a *key* span of a **correct** rollout:
  ``D_t = KL(p_T(·|s_t) ‖ π_θ(·|s_t))``, which lifts the teacher-supported tokens the
  student under-allocates;
* ``m_t = 2`` (reverse KL, optional) if it lies in an *error* span of an
  **incorrect** rollout: ``D_t = KL(π_θ ‖ p_T)``;
* ``m_t = 0`` otherwise: the GRPO clipped surrogate ``L^PG_t``.

``p_T`` is a teacher model, a logit store, or — self-distillation — the
policy itself (stop-gradient) conditioned on the rollout's
``privileged_prompt`` (e.g. the problem with its reference solution).  The KL
channel is annealed away: with ``a_t = max(0, 1 − step/W)`` (``--kl-warmup W``;
``a_t = 1`` without it) the per-token loss is

    ℓ_t = (1 − a_t [m_t ≠ 0]) · L^PG_t + a_t λ_{m_t} D_t,       λ_1 = --key-kl-coef, λ_2 = --error-kl-coef

so routed tokens return to GRPO as the KL fades.  The paper's abstract fixes
the routing and "annealed away after a short warm-up"; the linear decay over
the first W optimizer steps and the hand-over of routed tokens to GRPO are
our reading (its schedule was not readable here).  A span on a rollout of the
other outcome (a key span of a wrong answer, an error span of a right one)
routes nothing: its tokens stay on GRPO.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from fdivctl.divergences.kl import ForwardKL, ReverseKL
from fdivctl.engine.chunk_loss import ChunkLoss
from fdivctl.engine.targets import Target
from fdivctl.errors import UserError

GRPO, KEY, ERROR = 0, 1, 2
KINDS = {"key": KEY, "error": ERROR}


def read_spans(table: pa.Table, path: Path, lengths: list[int]) -> list[list[tuple[int, int, int]]]:
    """The ``spans`` column (list of {start, end, kind}; null = none) per row, checked against the completion
    ``lengths``: ``0 ≤ start < end ≤ length`` and ``kind ∈ {key, error}``; UserError naming the row otherwise."""
    if "spans" not in table.column_names:
        raise UserError(f"{path}: --algo trace needs a spans column (per rollout a list of {{start, end, kind}} "
                        "over completion tokens, kind key|error)")
    field = table.schema.field("spans").type
    if not (pa.types.is_list(field) or pa.types.is_large_list(field)) or not pa.types.is_struct(field.value_type) \
            or {"start", "end", "kind"} - {f.name for f in field.value_type}:
        raise UserError(f"{path}: column 'spans' must be list<struct<start: int, end: int, kind: string>>, "
                        f"got {field}")
    rows = []
    for row, (spans, length) in enumerate(zip(table.column("spans").to_pylist(), lengths)):
        parsed = []
        for span in spans or []:
            start, end, kind = span["start"], span["end"], span["kind"]
            if kind not in KINDS:
                raise UserError(f"{path}: row {row} has a span of kind {kind!r}; valid: key, error")
            if start is None or end is None or not 0 <= start < end <= length:
                raise UserError(f"{path}: row {row} has the span [{start}, {end}) outside its {length} completion "
                                "tokens (spans are token offsets [start, end))")
            parsed.append((int(start), int(end), KINDS[kind]))
        rows.append(parsed)
    return rows


def token_routes(spans: list[list[tuple[int, int, int]]], lengths: list[int], correct: np.ndarray,
                 error_channel: bool) -> torch.Tensor:
    """``m_t`` for every completion token (rows concatenated), int8: key spans of correct rollouts → 1, error spans
    of incorrect rollouts → 2 (only with ``error_channel``), everything else → 0."""
    parts = []
    for row_spans, length, ok in zip(spans, lengths, correct):
        route = np.zeros(length, dtype=np.int8)
        for start, end, kind in row_spans:
            if (kind == KEY and ok) or (kind == ERROR and not ok and error_channel):
                route[start:end] = kind
        parts.append(route)
    return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.int8)


def kl_anneal(step: int, warmup: int | None) -> float:
    """``a_t``: 1 throughout without a warm-up, else ``max(0, 1 − step/W)``."""
    return 1.0 if warmup is None else max(0.0, 1.0 - step / warmup)


class RoutedKL(ChunkLoss):
    """``D_t`` of the module docstring per token: forward KL where ``m_t = 1``, reverse KL where ``m_t = 2``, 0
    elsewhere (closed form over the target's support: the full vocabulary, or a store's top-k + tail)."""

    name = "trace"

    def __init__(self, routes: torch.Tensor | None = None):
        self.routes = routes

    def bind(self, routes: torch.Tensor) -> RoutedKL:
        return RoutedKL(routes)

    def take(self, index):
        return RoutedKL(self.routes[index])

    def validate(self, n_tokens, target):
        if self.routes is None or len(self.routes) != n_tokens:
            raise ValueError(f"trace needs one route per token ({n_tokens}): RoutedKL().bind(routes)")

    def chunk_values(self, log_q, target: Target, rows, temperature):
        log_q_s, log_p_s = target.support(rows, log_q, temperature)
        route = self.routes[rows].to(log_q.device)
        forward = ForwardKL().support_divergence(log_q_s, log_p_s)
        reverse = ReverseKL().support_divergence(log_q_s, log_p_s)
        zero = torch.zeros_like(forward)
        return torch.where(route == KEY, forward, torch.where(route == ERROR, reverse, zero))
