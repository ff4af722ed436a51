"""``fdivctl score``: verify rollouts in parallel, each under a time limit."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fdivctl.cli.progress import progress_bar
from fdivctl.rewards.verifiers import make_reward
from fdivctl.stages.score import score_table


def command(
    rollouts: Path = typer.Argument(..., help="Rollouts Parquet (from `fdivctl rollout`, or any table with "
                                    "prompt_id and completion)."),
    out: Path = typer.Argument(..., help="Scored Parquet to write: the input plus reward, correct, verdict, pass_rate."),
    verifier: list[str] = typer.Option(
        None, "--verifier", help="math | math-verify | exact | regex | sql | python:MODULE:FUNC (a function "
        "(completion, row) → float; row holds the rollout's columns, e.g. a list of test cases, but its token ids "
        "and log-probs) | trl:MODULE:FUNC (a reward function written for TRL's GRPOTrainer, as it is: "
        "(prompts, completions, completion_ids, **columns) → [reward or None]; conversational when the row has "
        "messages). Default math. Repeat it to "
        "sum several rewards (e.g. correctness and format): correct and pass_rate are the first one's."
    ),
    reward_weights: str = typer.Option(None, help="Weights of the repeated --verifier rewards, comma-separated "
                                       "(default 1 each): reward = Σ weight × reward."),
    pattern: str = typer.Option(None, help="Regex for --verifier regex (default: the row's answer column)."),
    answer_column: str = typer.Option(None, help="Column of the gold answer that math, math-verify, exact, sql "
                                      "and a regex without --pattern read (default: answer; e.g. solution)."),
    db: Path = typer.Option(None, help="SQLite database for --verifier sql (default: the row's db_path column)."),
    sql_timeout: float = typer.Option(5.0, help="Seconds each SQL query may run."),
    workers: int = typer.Option(4, help="Verifier processes."),
    timeout: float = typer.Option(10.0, help="Seconds one row's verification may take; past it the row scores 0."),
    part_rows: int = typer.Option(1024, help="Rows verified per part; each finished part is saved in OUT.parts/ "
                                  "until OUT is written, so an interrupted run loses at most one part."),
    resume: bool = typer.Option(False, help="Continue an interrupted run from its saved parts (same input and "
                                "verifier settings)."),
) -> None:
    """Verify completions and write reward, correct, verdict and per-prompt pass_rate."""
    spec = make_reward(verifier, reward_weights, pattern=pattern, db=str(db) if db else None, sql_timeout=sql_timeout,
                       answer_column=answer_column)
    with progress_bar("score", "rows") as progress:
        task = progress.add_task("score", total=None)
        summary = score_table(rollouts, out, spec, workers=workers, timeout=timeout,
                              on_done=lambda n: progress.advance(task, n), part_rows=part_rows, resume=resume)
    if summary["verifier_failures"]:
        typer.echo(f"fdivctl: warning: {summary['verifier_failures']} of {summary['rows']} rows scored 0 because "
                   f"their verification failed (the verdict column says why; first: {summary['first_failure']})",
                   err=True)
    typer.echo(json.dumps({"scored": str(out), **summary}))


def register(app: typer.Typer) -> None:
    app.command("score")(command)
