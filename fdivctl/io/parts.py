"""An interrupted run's finished pieces: ``OUT.parts/`` beside the output, with the settings it was started with.

A long stage (rollout, score) writes each finished piece to ``OUT.parts/part-NNNNNN.parquet`` (atomically) and
joins them into ``OUT`` at the end, then removes the directory; ``--resume`` keeps the pieces an interrupted run
finished, and refuses a run with other settings (``run.json``).
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

from fdivctl.errors import UserError
from fdivctl.io.atomic import write_json


def parts_dir(out: Path) -> Path:
    """Where the pieces of a run writing ``out`` are kept."""
    return out.with_name(out.name + ".parts")


def part_path(parts: Path, number: int) -> Path:
    return parts / f"part-{number:06d}.parquet"


@contextmanager
def open_parts(out: Path, record: dict, resume: bool):
    """The parts directory of a run writing ``out`` with settings ``record``: a new one, or with ``resume`` the
    interrupted run's (same settings only).  The block joins the pieces into ``out``; when it succeeds the directory
    is removed.  A UserError raised inside, before any piece exists, removes it too: bad input met early leaves no
    interrupted run behind."""
    parts = parts_dir(out)
    if parts.exists():
        if not resume:
            raise UserError(f"{parts} holds an interrupted run: pass --resume to continue it, or remove it")
        if json.loads((parts / "run.json").read_text()) != record:
            raise UserError(f"{parts} holds an interrupted run with other settings; remove it, or continue it with "
                            "the same ones")
    else:
        parts.mkdir(parents=True)
        write_json(parts / "run.json", record)
    try:
        yield parts
    except UserError:
        if not any(parts.glob("part-*.parquet")):
            shutil.rmtree(parts)
        raise
    shutil.rmtree(parts)
