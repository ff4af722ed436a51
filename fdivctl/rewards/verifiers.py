"""Verifier selection: ``math``, ``math-verify``, ``exact``, ``regex``, ``sql``, ``python:MODULE:FUNC``.

A verifier maps one row (a dict with at least ``completion``) to
``(reward, correct, verdict)``.  Verifiers are plain picklable objects so the
scoring pool can run them in worker processes.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass

from fdivctl.errors import UserError
from fdivctl.rewards.math_answer import verify_math
from fdivctl.rewards.sql_exec import verify_sql

Result = tuple[float, bool, str]
NAMES = ("math", "math-verify", "exact", "regex", "sql", "python:MODULE:FUNC")


def _binary(correct: bool, verdict: str) -> Result:
    return (1.0 if correct else 0.0), correct, verdict


@dataclass
class Verifier:
    """A configured verifier; call it on a row."""

    kind: str
    pattern: str | None = None
    db: str | None = None
    sql_timeout: float = 5.0
    function: str | None = None

    def required_columns(self) -> list[str]:
        needed = ["completion"]
        if self.kind in ("math", "math-verify", "exact", "sql") or (self.kind == "regex" and not self.pattern):
            needed.append("answer")
        if self.kind == "sql" and not self.db:
            needed.append("db_path")
        return needed

    def __call__(self, row: dict) -> Result:
        completion = row["completion"] or ""
        if self.kind == "math":
            return _binary(*verify_math(completion, row["answer"]))
        if self.kind == "math-verify":
            from math_verify import parse, verify

            ok = bool(verify(parse(str(row["answer"])), parse(completion)))
            return _binary(ok, "math-verify: " + ("equivalent" if ok else "not equivalent"))
        if self.kind == "exact":
            ok = completion.strip() == str(row["answer"]).strip()
            return _binary(ok, "exact match" if ok else "not an exact match")
        if self.kind == "regex":
            pattern = self.pattern or str(row["answer"])
            ok = re.search(pattern, completion) is not None
            return _binary(ok, f"pattern {'found' if ok else 'not found'}")
        if self.kind == "sql":
            return _binary(*verify_sql(completion, str(row["answer"]), self.db or row["db_path"], self.sql_timeout))
        module, func = self.function.rsplit(":", 1)
        reward = float(getattr(importlib.import_module(module), func)(completion, row))
        if not math.isfinite(reward):
            raise ValueError(f"{self.function} returned {reward}: a reward must be a finite number")
        return reward, reward > 0, f"{self.function} → {reward:g}"


def make_verifier(spec: str, pattern: str | None = None, db: str | None = None, sql_timeout: float = 5.0) -> Verifier:
    """Parse ``--verifier``; check that what it needs exists."""
    if spec.startswith("python:"):
        target = spec[len("python:") :]
        if ":" not in target:
            raise UserError(f"--verifier {spec!r}: expected python:MODULE:FUNC")
        module, func = target.rsplit(":", 1)
        try:
            fn = getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError) as err:
            raise UserError(f"--verifier {spec!r}: cannot import {module}.{func} ({err})") from None
        if not callable(fn):
            raise UserError(f"--verifier {spec!r}: {module}.{func} is not callable")
        return Verifier("python", function=target)
    if spec not in NAMES:
        raise UserError(f"unknown verifier {spec!r}; valid: {', '.join(NAMES)}")
    if spec == "math-verify":
        try:
            importlib.import_module("math_verify")
        except ImportError:
            raise UserError("--verifier math-verify needs the math-verify package (pip install math-verify)") from None
    if spec == "regex" and pattern is not None:
        try:
            re.compile(pattern)
        except re.error as err:
            raise UserError(f"--pattern {pattern!r} is not a valid regular expression ({err})") from None
    return Verifier(spec, pattern=pattern, db=db, sql_timeout=sql_timeout)
