"""Run the fdivctl entry point in-process (or under torchrun), with the result shaped like subprocess.run's."""

import contextlib
import io
import os
import signal
import subprocess
import sys

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


def ctrl_c_reaches_it() -> None:
    """``preexec_fn`` for a child that a test interrupts: SIGINT back to its default, so that Python turns it into
    KeyboardInterrupt.  A shell without job control starts background jobs with SIGINT ignored, and Python keeps an
    inherited ignore: under ``pytest … &`` the signal was dropped and the command ran to its end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_torchrun(*args, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node nproc -m fdivctl ARGS`` (gloo on the CPU), one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "fdivctl", *map(str, args)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as process:
        try:
            out, err = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:  # a hung collective: end torchrun and its workers, not torchrun alone
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            err += "\n[run_torchrun: killed after 300 s]"
    return subprocess.CompletedProcess(command, process.returncode, out, _without_launcher_traceback(err))


def _without_launcher_traceback(err: str) -> str:
    """torchrun's own traceback (its frames up to ChildFailedError) cut out, so that a failure message's tail shows
    the workers' output and the launcher's summary of which rank failed how."""
    start = err.find('Traceback (most recent call last):\n  File "<frozen runpy>"')
    end = err.find("ChildFailedError:", start)
    return err if start < 0 or end < 0 else err[:start] + err[end:]
