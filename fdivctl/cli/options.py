"""Option parsing shared by several commands."""

from __future__ import annotations

from fdivctl.errors import UserError


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/n"`` → (i, n)."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise UserError(f"--shard {spec!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise UserError(f"--shard {spec}: need 0 ≤ i < n")
    return i, n
