"""Atomic writes: a temporary name in the same directory, then ``os.replace``.

A reader never sees a half-written file: either the previous version or the
new one.  On any exception the temporary is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fdivctl.errors import UserError, storage_failures_named


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    A full disk or a forbidden path (:func:`fdivctl.errors.storage_failure`) becomes a :class:`UserError` that
    names ``path``."""
    path = Path(path)
    _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with storage_failures_named(path):
            yield tmp_path
            os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def check_output_file(path: str | Path, stream_ok: bool = False) -> Path:
    """Refuse, before any work, a file output that cannot be written: ``path`` is a directory, lies under a
    file, or (unless ``stream_ok``: an output appended to, such as a log) is a device or a pipe."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory: give the output a file name")
    if not stream_ok:
        _check_replaceable(path)
    _check_parents(path)
    return path


def _check_replaceable(path: Path) -> None:
    """Refuse to write a file over what is no regular file (a device, a pipe, /dev/stdout even when the shell
    sends it to a file): the rename that makes the write atomic would replace that entry itself."""
    system = path.absolute().parts[1:2] in (("dev",), ("proc",))
    if system or (path.exists() and not path.is_dir() and not path.is_file()):
        raise UserError(f"{path} is not a regular file (a device or a pipe): fdivctl writes a file and renames it "
                        "into place; give a file path")


def check_output_dir(path: str | Path) -> Path:
    """Refuse, before any work, a directory output that cannot be made: ``path`` is a file, or lies under one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a directory")
    _check_parents(path)
    return path


def _check_parents(path: Path) -> None:
    existing = next(parent for parent in path.absolute().parents if parent.exists())
    if not existing.is_dir():
        raise UserError(f"{path}: {existing} is a file, so nothing can be written under it")


def write_json(path: str | Path, data: object) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
