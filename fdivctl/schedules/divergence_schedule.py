"""A divergence that changes over training: ``"fkl:0.5,rkl:0.5"``.

Each entry is ``SPEC:FRACTION`` (SPEC as in the registry, e.g. ``jsd:beta=0.3``;
the fraction after the last colon); the entries take consecutive shares of
the optimizer steps, in order, and the fractions must sum to 1.  PACED's
two-stage recipe (seed: "PACED: Distillation at the Frontier of Student
Competence") is forward KL then reverse KL: ``"fkl:0.5,rkl:0.5"``.  ``distill``
also schedules its non-f losses (``pld``, ``sinkhorn``, ``bdkd``) this way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fdivctl import divergences
from fdivctl.divergences import Divergence
from fdivctl.engine import ChunkLoss


@dataclass
class DivergenceSchedule:
    stages: list[tuple[Divergence | ChunkLoss, float]]

    @classmethod
    def parse(
        cls, spec: str, parse_one: Callable[[str], Divergence | ChunkLoss] = divergences.parse
    ) -> DivergenceSchedule:
        stages = []
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, sep, fraction = item.rpartition(":")
            if not sep or not name:
                raise ValueError(f"schedule entry {item!r}: expected SPEC:FRACTION, e.g. fkl:0.5")
            try:
                share = float(fraction)
            except ValueError:
                raise ValueError(f"schedule entry {item!r}: {fraction!r} is not a number") from None
            if not share > 0:
                raise ValueError(f"schedule entry {item!r}: the fraction must be > 0")
            stages.append((parse_one(name), share))
        if not stages:
            raise ValueError("the schedule is empty")
        total = sum(share for _, share in stages)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"schedule fractions sum to {total:g}, not 1")
        return cls(stages)

    def at(self, step: int, total_steps: int) -> Divergence | ChunkLoss:
        """The divergence of optimizer step ``step`` (0-based) out of ``total_steps``."""
        progress = step / max(1, total_steps)
        boundary = 0.0
        for divergence, share in self.stages:
            boundary += share
            if progress < boundary - 1e-12:
                return divergence
        return self.stages[-1][0]
