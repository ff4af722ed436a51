"""Verifier selection: ``math``, ``math-verify``, ``exact``, ``regex``, ``sql``, ``python:MODULE:FUNC``,
``trl:MODULE:FUNC`` (a TRL reward function as it is), and a weighted sum of several (:class:`VerifierSum`,
:func:`make_reward`).

A verifier maps one row (a dict with at least ``completion``) to
``(reward, correct, verdict)``.  Verifiers are plain picklable objects so the
scoring pool can run them in worker processes.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import math
import re
from dataclasses import asdict, dataclass

from fdivctl.errors import UserError
from fdivctl.rewards.math_answer import verify_math
from fdivctl.rewards.sql_exec import verify_sql

Result = tuple[float, bool, str]
NAMES = ("math", "math-verify", "exact", "regex", "sql", "python:MODULE:FUNC", "trl:MODULE:FUNC")
#: the verifiers that are a user's function, by the prefix of their spec
USER_FUNCTIONS = ("python", "trl")


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
    answer_column: str | None = None  # the gold answer's column (None: answer) for math, math-verify, exact, sql, regex

    @property
    def answer(self) -> str:
        """The column the gold answer is read from."""
        return self.answer_column or "answer"

    def required_columns(self) -> list[str]:
        needed = ["completion"]
        if self.kind in ("math", "math-verify", "exact", "sql") or (self.kind == "regex" and not self.pattern):
            needed.append(self.answer)
        if self.kind == "sql" and not self.db:
            needed.append("db_path")
        return needed

    @property
    def reads_row(self) -> bool:
        """Whether it reads the row's other columns (a user function)."""
        return self.kind in USER_FUNCTIONS

    @property
    def token_columns(self) -> tuple[str, ...]:
        """Per-token columns it reads when the table has them (TRL's ``completion_ids``)."""
        return ("completion_token_ids",) if self.kind == "trl" else ()

    def record(self) -> dict:
        """What a scored file's provenance says scored it."""
        return {"verifier": self.kind, "function": self.function, "pattern": self.pattern,
                **({"answer_column": self.answer_column} if self.answer_column else {})}

    def __call__(self, row: dict) -> Result:
        completion = row["completion"] or ""
        if self.kind == "math":
            return _binary(*verify_math(completion, row[self.answer]))
        if self.kind == "math-verify":
            from math_verify import parse, verify

            ok = bool(verify(parse(str(row[self.answer])), parse(completion)))
            return _binary(ok, "math-verify: " + ("equivalent" if ok else "not equivalent"))
        if self.kind == "exact":
            ok = completion.strip() == str(row[self.answer]).strip()
            return _binary(ok, "exact match" if ok else "not an exact match")
        if self.kind == "regex":
            pattern = self.pattern or str(row[self.answer])
            ok = re.search(pattern, completion) is not None
            return _binary(ok, f"pattern {'found' if ok else 'not found'}")
        if self.kind == "sql":
            return _binary(*verify_sql(completion, str(row[self.answer]), self.db or row["db_path"],
                                       self.sql_timeout))
        module, func = self.function.rsplit(":", 1)
        fn = getattr(importlib.import_module(module), func)
        if self.kind == "trl":
            value = _call_trl(fn, self.function, completion, row)
            if value is None:
                return 0.0, False, f"{self.function} → None (not applicable: 0)"
        else:
            value = fn(completion, row)
        reward = float(value)
        if not math.isfinite(reward):
            raise ValueError(f"{self.function} returned {reward}: a reward must be a finite number")
        return reward, reward > 0, f"{self.function} → {reward:g}"


def _ignore(*_args, **_kwargs) -> None:
    """TRL's ``log_extra`` / ``log_metric`` callbacks: fdivctl keeps each row's verdict instead."""


def _call_trl(fn, name: str, completion: str, row: dict):
    """One row through a TRL reward function, as TRL's GRPOTrainer calls it on a batch (here of one):
    ``fn(prompts, completions, completion_ids, trainer_state, log_extra, log_metric, **columns) -> [float | None]``.

    Conversational when the row has ``messages`` (the prompt's chat, TRL's conversational prompt): ``prompts``
    gets those messages and ``completions`` the reply as ``[{"role": "assistant", "content": …}]``; else both
    are text.  Every other column comes as a one-element list keyword, as TRL passes the dataset's columns;
    ``completion_ids`` is the row's ``completion_token_ids`` (None where absent), ``trainer_state`` None.  An
    ``async`` function is run to completion.  Returns the one value (None: not applicable)."""
    messages = row.get("messages")
    chat = isinstance(messages, list)
    prompt = messages if chat else row.get("prompt")
    reply = [{"role": "assistant", "content": completion}] if chat else completion
    columns = {k: [v] for k, v in row.items() if k not in ("prompt", "completion", "completion_token_ids")}
    out = fn(prompts=[prompt], completions=[reply], completion_ids=[row.get("completion_token_ids")],
             trainer_state=None, log_extra=_ignore, log_metric=_ignore, **columns)
    if inspect.isawaitable(out):
        out = asyncio.run(out)
    # any sequence of rewards, as TRL takes (a list, a tuple, a NumPy array, a tensor)
    values = list(out) if hasattr(out, "__len__") and not isinstance(out, str | bytes | dict) else None
    if values is None or len(values) != 1:
        raise ValueError(f"{name} returned {out!r} for one completion: a TRL reward function returns a list with "
                         "one reward (a number or None) per completion")
    return values[0]


@dataclass
class VerifierSum:
    """``reward = Σ_i w_i · reward_i`` over several verifiers: a correctness reward plus shaping rewards (format,
    length), as R1-style recipes combine them (TRL's ``reward_funcs`` with ``reward_weights``).  ``correct``, and
    so pass rates and pass@k, is the first verifier's; the verdict joins every part's.  A part that fails fails
    the row (scored 0, the reason in its verdict), as one verifier's failure does."""

    parts: tuple[Verifier, ...]
    weights: tuple[float, ...]

    @property
    def kind(self) -> str:
        return "+".join(part.kind for part in self.parts)

    @property
    def reads_row(self) -> bool:
        return any(part.reads_row for part in self.parts)

    @property
    def token_columns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c for part in self.parts for c in part.token_columns))

    def required_columns(self) -> list[str]:
        return list(dict.fromkeys(column for part in self.parts for column in part.required_columns()))

    def record(self) -> dict:
        return {"verifier": self.kind, "parts": [asdict(part) for part in self.parts], "weights": list(self.weights)}

    def __call__(self, row: dict) -> Result:
        results = [part(row) for part in self.parts]
        reward = sum(w * float(r) for w, (r, _, _) in zip(self.weights, results))
        return reward, bool(results[0][1]), " | ".join(f"{w:g}×[{v}]" for w, (_, _, v) in zip(self.weights, results))


#: what scores a row: one verifier or a weighted sum of several
Reward = Verifier | VerifierSum


def make_reward(specs: list[str], weights: str | None = None, pattern: str | None = None, db: str | None = None,
                sql_timeout: float = 5.0, answer_column: str | None = None) -> Reward:
    """The reward of ``--verifier`` (repeatable) and ``--reward-weights``: one verifier, or the weighted sum of
    several (weights default to 1 each).  ``pattern``, ``db``, ``sql_timeout`` and ``answer_column`` go to the
    parts that take them."""
    parts = [make_verifier(spec, pattern, db, sql_timeout, answer_column) for spec in specs or ["math"]]
    if weights is None:
        values = [1.0] * len(parts)
    else:
        try:
            values = [float(w) for w in weights.split(",")]
        except ValueError:
            raise UserError(f"--reward-weights {weights!r}: comma-separated numbers, one per --verifier") from None
        if len(values) != len(parts) or not all(math.isfinite(w) for w in values):
            raise UserError(f"--reward-weights {weights!r}: {len(parts)} finite numbers, one per --verifier")
    if len(parts) == 1 and values == [1.0]:
        return parts[0]
    return VerifierSum(tuple(parts), tuple(values))


def make_verifier(spec: str, pattern: str | None = None, db: str | None = None, sql_timeout: float = 5.0,
                  answer_column: str | None = None) -> Verifier:
    """Parse ``--verifier``; check that what it needs exists."""
    kind, colon, target = spec.partition(":")
    if kind in USER_FUNCTIONS and colon:
        if ":" not in target:
            raise UserError(f"--verifier {spec!r}: expected {kind}:MODULE:FUNC")
        module, func = target.rsplit(":", 1)
        try:
            fn = getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError) as err:
            raise UserError(f"--verifier {spec!r}: cannot import {module}.{func} ({err})") from None
        if not callable(fn):
            raise UserError(f"--verifier {spec!r}: {module}.{func} is not callable")
        return Verifier(kind, function=target)
    if spec not in NAMES:
        raise UserError(f"unknown verifier {spec!r}; valid: {', '.join(NAMES)}")
    if spec == "math-verify":
        try:
            importlib.import_module("math_verify")
        except ImportError:
            raise UserError("--verifier math-verify needs the math-verify package (pip install math-verify)") from None
    if spec == "sql" and not sql_timeout > 0:
        raise UserError(f"--sql-timeout must be > 0 seconds, got {sql_timeout:g} (every query would be cut off, "
                        "and every completion score 0)")
    if spec == "regex" and pattern is not None:
        try:
            re.compile(pattern)
        except re.error as err:
            raise UserError(f"--pattern {pattern!r} is not a valid regular expression ({err})") from None
    return Verifier(spec, pattern=pattern, db=db, sql_timeout=sql_timeout, answer_column=answer_column)
