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

from fdivctl.training.distributed import is_main


class _Rate(TextColumn):
    """Items per second of a task, with its unit."""

    def __init__(self, unit: str):
        super().__init__("")
        self.unit = unit

    def render(self, task):
        speed = task.finished_speed or task.speed
        return f"{speed:,.0f} {self.unit}/s" if speed else f"– {self.unit}/s"


@contextlib.contextmanager
def progress_bar(description: str, unit: str) -> Iterator[Progress]:
    """A Progress with a rate column; disabled when stderr is not a terminal."""
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
    with progress:
        yield progress
