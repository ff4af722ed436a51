"""A rich progress bar for long work: shown on a terminal, silent in pipes."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fdivctl import activity
from fdivctl.training.distributed import is_main


class _Rate(TextColumn):
    """Items per second of a task, with its unit (the task's own ``unit`` field, else the bar's)."""

    def __init__(self, unit: str):
        super().__init__("")
        self.unit = unit

    def render(self, task):
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", self.unit)
        return f"{speed:,.0f} {unit}/s" if speed else f"– {unit}/s"


@contextlib.contextmanager
def progress_bar(description: str, unit: str) -> Iterator[Progress]:
    """A Progress with a rate column; disabled when stderr is not a terminal.  Inside it, each work
    reported through :func:`fdivctl.activity.report` (reading data) gets a bar of its own."""
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not sys.stderr.isatty() or not is_main(),  # under torchrun only rank 0 draws
    )
    tasks: dict[str, int] = {}

    def show(work: str, unit: str, done: int, total: int) -> None:
        if work not in tasks:
            tasks[work] = progress.add_task(work, total=total, unit=unit)
        progress.update(tasks[work], completed=done, total=total)

    with progress, activity.listening(show):
        yield progress
