"""``fdivctl pairs``: preference pairs from scored rollouts, for ``train --algo fdpo``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fdivctl.stages.pairs import make_pairs


def command(
    scored: Path = typer.Argument(..., help="Scored rollouts Parquet (fdivctl rollout, then fdivctl score): "
                                  "prompt_id, prompt, completion, reward, and the token ids when it has them."),
    out: Path = typer.Argument(..., help="Pairs Parquet to write: the prompt's columns, chosen, rejected, their "
                               "rewards, sample indices and token ids (train --algo fdpo --pairs reads it)."),
    per_prompt: int = typer.Option(1, help="Pairs per prompt at most: distinct (chosen, rejected) combinations "
                                   "drawn from its best × worst samples."),
    min_margin: float = typer.Option(0.0, help="Pair a prompt only when its best and worst rewards differ by more "
                                     "than this (0: any difference; with 0/1 rewards, a correct and an incorrect "
                                     "sample)."),
    seed: int = typer.Option(0, help="Seed of the draw (with the prompt id: the same pairs in any row order)."),
) -> None:
    """Preference pairs from scored rollouts: per prompt, a best-reward sample chosen over a worst-reward one."""
    summary = make_pairs(scored, out, per_prompt=per_prompt, min_margin=min_margin, seed=seed)
    typer.echo(json.dumps({"pairs_file": str(out), **summary}))


def register(app: typer.Typer) -> None:
    app.command("pairs")(command)
