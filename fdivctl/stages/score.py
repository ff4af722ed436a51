"""``score``: verify rollouts and add ``reward``, ``correct``, ``verdict``, ``pass_rate``.

``pass_rate`` is the share of correct samples among the rows of the same
``prompt_id`` (every row of a prompt carries it).  The input's columns and
provenance are kept; the verifier is added to the provenance.

With ``part_rows`` the rows are verified that many at a time and each part's
verdicts are saved as it finishes (:mod:`fdivctl.io.parts`), so an interrupted
run (slow verifiers: code execution, SQL) resumes with ``resume`` where it
stopped instead of from the first row.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fdivctl.errors import UserError
from fdivctl.io.atomic import atomic_path, check_output_file
from fdivctl.io.hashing import file_fingerprint
from fdivctl.io.parts import open_parts, part_path
from fdivctl.io.tables import open_parquet, provenance, read_table, require_columns, write_table
from fdivctl.rewards.pool import failures, run_pool
from fdivctl.rewards.verifiers import Reward

ADDED = ("reward", "correct", "verdict", "pass_rate")


def score_table(
    rollouts: str | Path,
    out: str | Path,
    verifier: Reward,
    workers: int = 4,
    timeout: float = 10.0,
    on_done: Callable[[int], None] | None = None,
    part_rows: int | None = None,
    resume: bool = False,
) -> dict:
    """Score every row of ``rollouts`` into ``out``; return a summary (rows, mean reward, accuracy, and how many
    rows' verification failed: scored 0, with the reason in their verdict)."""
    if workers < 1 or not timeout > 0:
        raise UserError("--workers must be ≥ 1 and --timeout > 0")
    if part_rows is not None and part_rows < 1:
        raise UserError(f"--part-rows must be ≥ 1, got {part_rows}")
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
    if verifier.reads_row:  # a user function sees the row's columns (test cases, tools, messages), token ids aside
        columns += [name for name in table.column_names if name not in PER_TOKEN or name in verifier.token_columns]
    rows = table.select(list(dict.fromkeys(columns))).to_pylist()
    record = {"scored_by": {**verifier.record(), "timeout": timeout}}
    in_parts = open_parts(Path(out), {**record, "source": str(Path(rollouts).resolve()), "part_rows": part_rows,
                                      "source_fingerprint": file_fingerprint(rollouts)}, resume) \
        if part_rows else contextlib.nullcontext()
    with in_parts as parts:
        results = run_pool(verifier, rows, workers, timeout, on_done) if parts is None else \
            _verify_in_parts(verifier, rows, workers, timeout, on_done, parts, part_rows)
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
        write_table(out, scored, {**provenance(rollouts), **record})
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


#: a rollout's per-token columns, which a user verifier is not sent (a list per token, and per row many thousands)
PER_TOKEN = ("prompt_token_ids", "completion_token_ids", "completion_logprobs", "turn_ids")


def check_prompt_columns(prompts: str | Path, verifier: Reward) -> None:
    """Refuse, before anything is sampled, a prompts file without the columns ``verifier`` reads from each
    prompt's row (``answer``, ``db_path``), which rollout carries into the rollouts it then scores."""
    needed = [c for c in verifier.required_columns() if c != "completion"]
    require_columns(open_parquet(prompts).schema_arrow.empty_table(), prompts, needed,
                    f" (--verifier {verifier.kind} reads it from each prompt's row)")


def _verify_in_parts(verifier, rows: list[dict], workers: int, timeout: float, on_done, parts: Path,
                     part_rows: int) -> list[tuple[float, bool, str]]:
    """The verdicts of ``rows``, ``part_rows`` at a time: a part an interrupted run finished is read back, each new
    one is saved (atomically) as it finishes."""
    results = []
    for number, start in enumerate(range(0, len(rows), part_rows)):
        chunk, part = rows[start : start + part_rows], part_path(parts, number)
        if part.exists():
            saved = pq.read_table(part).to_pydict()
            results += list(zip(saved["reward"], saved["correct"], saved["verdict"]))
            if on_done:
                on_done(len(chunk))
            continue
        verdicts = run_pool(verifier, chunk, workers, timeout, on_done)
        with atomic_path(part) as tmp:
            pq.write_table(pa.table({"reward": pa.array([r[0] for r in verdicts], pa.float32()),
                                     "correct": [r[1] for r in verdicts], "verdict": [r[2] for r in verdicts]}), tmp)
        results += verdicts
    return results
