"""The registry: divergence names → entries, with parameter validation."""

from __future__ import annotations

import inspect

from fdivctl.divergences.alpha import AlphaDivergence
from fdivctl.divergences.base import Divergence
from fdivctl.divergences.hellinger import SquaredHellinger
from fdivctl.divergences.jsd import GeneralizedJSD
from fdivctl.divergences.kl import ForwardKL, ReverseKL, SkewKL, SkewReverseKL
from fdivctl.divergences.tv import TotalVariation

_ENTRIES: dict[str, type[Divergence]] = {
    cls.name: cls
    for cls in (
        ForwardKL,
        ReverseKL,
        GeneralizedJSD,
        TotalVariation,
        SquaredHellinger,
        AlphaDivergence,
        SkewKL,
        SkewReverseKL,
    )
}


def names() -> list[str]:
    """Every registered divergence name."""
    return list(_ENTRIES)


def param_defaults(name: str) -> dict[str, float]:
    """The parameters an entry takes, with their defaults."""
    signature = inspect.signature(_entry(name).__init__)
    return {
        p.name: p.default
        for p in signature.parameters.values()
        if p.name != "self" and p.default is not inspect.Parameter.empty
    }


def _entry(name: str) -> type[Divergence]:
    if name not in _ENTRIES:
        raise ValueError(f"unknown divergence {name!r}; valid: {', '.join(_ENTRIES)}")
    return _ENTRIES[name]


def get(name: str | Divergence, **params: float) -> Divergence:
    """The divergence ``name`` with ``params`` (e.g. ``get("jsd", beta=0.3)``).

    A :class:`Divergence` instance is returned unchanged (no params allowed).
    Raises ValueError for an unknown name, an unknown parameter, or a value
    out of range, naming the valid choices.
    """
    if isinstance(name, Divergence):
        if params:
            raise ValueError(f"parameters {sorted(params)} given with a ready divergence {name!r}")
        return name
    entry = _entry(name)
    valid = param_defaults(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        choices = ", ".join(valid) if valid else "none"
        raise ValueError(f"divergence {name!r} has no parameter {unknown[0]!r}; valid: {choices}")
    return entry(**params)


def split_spec(spec: str) -> tuple[str, dict[str, float]]:
    """``"jsd:beta=0.3"`` → ``("jsd", {"beta": 0.3})``; ValueError naming the spec when malformed."""
    name, _, rest = spec.strip().partition(":")
    params: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"divergence spec {spec!r}: expected key=value, got {item!r}")
        if key.strip() in params:
            raise ValueError(f"divergence spec {spec!r}: {key.strip()} is given twice")
        try:
            params[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"divergence spec {spec!r}: {key.strip()} must be a number") from None
    return name, params


def parse(spec: str) -> Divergence:
    """Parse a command-line spec: ``"fkl"``, ``"jsd:beta=0.3"``, ``"alpha:alpha=0.2"``."""
    name, params = split_spec(spec)
    return get(name, **params)
