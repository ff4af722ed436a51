"""Progress of long work below the CLI (reading and expanding data before a stage's first step): the work
reports it, and a listener, the CLI's progress bar (:func:`fdivctl.cli.progress.progress_bar`), shows it.

Where nothing listens (a stage used from Python) a report costs one lookup.  The listener is a context variable,
so it is the calling thread's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

#: ``listener(description, unit, done, total)``
Listener = Callable[[str, str, int, int], None]

_listener: ContextVar[Listener | None] = ContextVar("fdivctl_activity_listener", default=None)


def report(description: str, unit: str, done: int, total: int) -> None:
    """``done`` of ``total`` ``unit`` of the work ``description`` are done (to the listener, if one listens)."""
    listener = _listener.get()
    if listener is not None:
        listener(description, unit, done, total)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send this thread's reports to ``listener`` inside the block."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)
