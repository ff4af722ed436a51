"""Stages that are designed (DESIGN.md) but not built yet: they say so and exit 2."""

from __future__ import annotations

import typer

from fdivctl.errors import UserError

PLANNED = {
    "train": "RL with verifiable rewards (GRPO family, DPH-RL, f-DPO) → checkpoint",
}


def _planned_command(name: str, summary: str):
    def command(
        args: list[str] = typer.Argument(None, hidden=True),
    ) -> None:
        raise UserError(f"'fdivctl {name}' is not built yet in this version")

    command.__doc__ = f"{summary[0].upper()}{summary[1:]}. (Not built yet: exits 2.)"
    return command


def register(app: typer.Typer) -> None:
    for name, summary in PLANNED.items():
        app.command(
            name,
            context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        )(_planned_command(name, summary))
