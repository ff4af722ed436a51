"""Run the fdivctl entry point in-process, with the result shaped like subprocess.run's."""

import contextlib
import io
import subprocess

from fdivctl.cli import main


def run_cli(*args, check: bool = False) -> subprocess.CompletedProcess:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code or 0
    done = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(done.stderr)
    return done
