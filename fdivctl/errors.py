"""The exception type that means "the user's input is wrong", and the file-system failures that are the user's
to fix.

Every layer raises :class:`UserError` (or ``ValueError`` from the pure-math
layers) for bad input; the CLI turns it into one line on stderr and exit
code 2, never a traceback.  So it does with an ``OSError`` that
:func:`storage_failure` recognizes (a full disk, a quota, a file-size limit, a
read-only or forbidden path).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator

#: the errno values a user fixes where the files live, not in fdivctl's input, with the fix to suggest
STORAGE_FIXES = {
    errno.ENOSPC: "free space there or write the output to another disk",
    errno.EDQUOT: "free space in your quota or write the output elsewhere",
    errno.EFBIG: "raise the file-size limit (ulimit -f) or write smaller parts",
    errno.EROFS: "write the output to a writable file system",
    errno.EACCES: "check the permissions of the path",
    errno.EPERM: "check the permissions of the path",
}


class UserError(ValueError):
    """Bad input that the user can fix; the message names the input and the fix."""


def storage_failure(err: BaseException, path: str | os.PathLike | None = None) -> str | None:
    """One line for a file-system failure of :data:`STORAGE_FIXES` (the file, the failure, the fix; pyarrow's
    own wording reduced to the system's), or None for any other error: a bug, shown as a traceback.  ``path``
    names the file where the error does not (pyarrow's and safetensors' do not).

    safetensors reports the failure as its own error type with ``(os error N)`` in the text,
    ``torch.distributed.checkpoint`` wraps each rank's in its ``failures``, and torch's zip writer raises its own
    error while the ``OSError`` of the stream it wrote to is the context; those count too."""
    for cause in _causes(err):
        code = cause.errno if isinstance(cause, OSError) else _rust_errno(cause)
        fix = STORAGE_FIXES.get(code)
        if fix is not None:
            filename = getattr(cause, "filename", None) or path
            where = f"{filename}: " if filename else ""
            return (f"{where}{os.strerror(code).lower()}: {fix}. No output was left half-written: what was saved "
                    "is kept, and running the command again (with --resume for rollout, score, train and distill) "
                    "continues from it")
    return None


@contextlib.contextmanager
def storage_failures_named(path: str | os.PathLike) -> Iterator[None]:
    """Turn a :func:`storage_failure` in the block into a :class:`UserError` naming ``path`` when the error names
    no file; any other error passes unchanged."""
    try:
        yield
    except BaseException as err:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        message = storage_failure(err, path)
        if message is None:
            raise
        raise UserError(message) from err


def _causes(err: BaseException | None, seen: frozenset[int] = frozenset()) -> Iterator[BaseException]:
    """``err``, the errors it wraps (``failures``) and the errors it was raised from or while handling."""
    if err is None or id(err) in seen:
        return
    seen = seen | {id(err)}
    yield err
    for wrapped, _ in getattr(err, "failures", {}).values():
        yield from _causes(wrapped, seen)
    yield from _causes(err.__cause__ or err.__context__, seen)


def _rust_errno(err: BaseException) -> int | None:
    """The errno in a Rust I/O error's text (``... (os error 28)``), as safetensors raises it."""
    found = re.search(r"\(os error (\d+)\)", str(err))
    return int(found.group(1)) if found else None
