"""``score``: verify rollouts and add ``reward``, ``correct``, ``verdict``, ``pass_rate``.

``pass_rate`` is the share of correct samples among the rows of the same
``prompt_id`` (every row of a prompt carries it).  The input's columns and
provenance are kept; the verifier is added to the provenance.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from fdivctl.errors import UserError
from fdivctl.io.atomic import check_output_file
from fdivctl.io.tables import provenance, read_table, require_columns, write_table
from fdivctl.rewards.pool import failures, run_pool
from fdivctl.rewards.verifiers import Verifier

ADDED = ("reward", "correct", "verdict", "pass_rate")


def score_table(
    rollouts: str | Path,
    out: str | Path,
    verifier: Verifier,
    workers: int = 4,
    timeout: float = 10.0,
    on_done: Callable[[int], None] | None = None,
) -> dict:
    """Score every row of ``rollouts`` into ``out``; return a summary (rows, mean reward, accuracy, and how many
    rows' verification failed: scored 0, with the reason in their verdict)."""
    if workers < 1 or not timeout > 0:
        raise UserError("--workers must be ≥ 1 and --timeout > 0")
    check_output_file(out)
    table = read_table(rollouts)
    require_columns(table, rollouts, verifier.required_columns() + ["prompt_id"])
    clash = [c for c in ADDED if c in table.column_names]
    if clash:
        raise UserError(f"{rollouts}: already has column {clash[0]!r} (is it scored already?)")
    for column in verifier.required_columns():
        field = table.schema.field(column).type
        if column == "completion" and not (pa.types.is_string(field) or pa.types.is_large_string(field)):
            raise UserError(f"{rollouts}: column 'completion' must be text, got {field}")
    columns = verifier.required_columns() + ["prompt_id"]
    if verifier.kind == "python":  # a user function sees the row's scalar columns (token lists stay here)
        columns += [f.name for f in table.schema if not pa.types.is_list(f.type)]
    rows = table.select(list(dict.fromkeys(columns))).to_pylist()
    results = run_pool(verifier, rows, workers, timeout, on_done)
    by_prompt: dict[object, list[bool]] = defaultdict(list)
    for row, (_, correct, _) in zip(rows, results):
        by_prompt[row["prompt_id"]].append(correct)
    rates = {pid: sum(c) / len(c) for pid, c in by_prompt.items()}
    scored = (
        table.append_column("reward", pa.array([r[0] for r in results], pa.float32()))
        .append_column("correct", pa.array([r[1] for r in results], pa.bool_()))
        .append_column("verdict", pa.array([r[2] for r in results], pa.string()))
        .append_column("pass_rate", pa.array([rates[row["prompt_id"]] for row in rows], pa.float32()))
    )
    record = {**provenance(rollouts), "scored_by": {"verifier": verifier.kind, "function": verifier.function,
                                                    "pattern": verifier.pattern, "timeout": timeout}}
    write_table(out, scored, record)
    n = len(results)
    failed = failures([r[2] for r in results])
    return {
        "rows": n,
        "prompts": len(rates),
        "mean_reward": sum(r[0] for r in results) / n,
        "accuracy": sum(r[1] for r in results) / n,
        "verifier_failures": len(failed),
        **({"first_failure": f"row {failed[0]}: {results[failed[0]][2]}"} if failed else {}),
    }
