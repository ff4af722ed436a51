"""``fdivctl divergences``: list the registry and evaluate it on a worked example."""

from __future__ import annotations

import torch
import typer
from rich.console import Console
from rich.table import Table

from fdivctl import divergences
from fdivctl.errors import UserError


def _example_logits(spec: str) -> torch.Tensor:
    try:
        probs = torch.tensor([float(x) for x in spec.split(",")], dtype=torch.float64)
    except ValueError:
        raise UserError(f"--p/--q must be comma-separated probabilities, got {spec!r}") from None
    if (probs < 0).any() or abs(float(probs.sum()) - 1.0) > 1e-6:
        raise UserError(f"--p/--q must be non-negative and sum to 1, got {spec!r}")
    return probs.log()


def command(
    p: str = typer.Option("0.6,0.3,0.1", "--p", help="Target distribution p (comma-separated)."),
    q: str = typer.Option("0.2,0.3,0.5", "--q", help="Model distribution q (comma-separated)."),
    spec: list[str] = typer.Option(
        None,
        "--divergence",
        "-d",
        help="Entries to show, as NAME or NAME:param=value (e.g. jsd:beta=0.1); default all.",
    ),
) -> None:
    """List every divergence in the registry with its formula, and D(q‖p) on an example."""
    log_p, log_q = _example_logits(p), _example_logits(q)
    if log_p.shape != log_q.shape:
        raise UserError(f"--p has {log_p.numel()} entries but --q has {log_q.numel()}")
    try:
        entries = [divergences.parse(s) for s in spec] if spec else [divergences.get(n) for n in divergences.names()]
    except ValueError as err:
        raise UserError(str(err)) from None
    table = Table(title=f"D(q‖p) with p=[{p}], q=[{q}]")
    for column in ("name", "params", "definition", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for entry in entries:
        value = entry.token_divergence(log_q, log_p).item()
        params = ", ".join(f"{k}={v:g}" for k, v in entry.params.items())
        # a zero where the other distribution has mass: log 0 is floored at −1e30, so an unbounded divergence
        # comes out near 1e29 · p instead of its true value, +∞
        table.add_row(entry.name, params, entry.summary, "inf" if value > 1e15 else f"{value:.6f}")
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("divergences")(command)
