"""``fdivctl soup``: average checkpoints of one architecture into a reference model (SALSA)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fdivctl.errors import UserError
from fdivctl.stages.soup import run_soup


def command(
    models: list[Path] = typer.Argument(..., help="Two or more model directories (save_pretrained) of one "
                                        "architecture and tokenizer."),
    out: Path = typer.Option(..., "-o", "--out", help="Model directory to write (must not exist); use it as "
                             "`train --ref-model`."),
    weights: str = typer.Option(None, help="Comma-separated non-negative weights, one per model, normalized to sum "
                                "to 1 (default: uniform)."),
) -> None:
    """Weight-space average Σ w_i θ_i of the models, in fp32, saved in the first model's dtype."""
    parsed = None
    if weights is not None:
        try:
            parsed = [float(w) for w in weights.split(",")]
        except ValueError:
            raise UserError(f"--weights {weights!r}: expected comma-separated numbers") from None
    typer.echo(json.dumps(run_soup(models, out, parsed)))


def register(app: typer.Typer) -> None:
    app.command("soup")(command)
