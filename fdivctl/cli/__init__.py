"""The ``fdivctl`` command: one subcommand per stage (DESIGN.md).

Each subcommand lives in its own module and only wires options to a stage;
errors that are the user's to fix (:class:`fdivctl.errors.UserError`) become
one line on stderr and exit code 2.
"""

from __future__ import annotations

import faulthandler
import sys
import traceback

import typer

from fdivctl import __version__
from fdivctl.cli import demo as demo_cmd
from fdivctl.cli import distill as distill_cmd
from fdivctl.cli import divergences as divergences_cmd
from fdivctl.cli import evaluate as evaluate_cmd
from fdivctl.cli import pairs as pairs_cmd
from fdivctl.cli import rollout as rollout_cmd
from fdivctl.cli import score as score_cmd
from fdivctl.cli import soup as soup_cmd
from fdivctl.cli import teacher_logits as teacher_logits_cmd
from fdivctl.cli import train as train_cmd
from fdivctl.cli.options import require_finite_floats
from fdivctl.errors import UserError, storage_failure
from fdivctl.io.versions import library_versions
from fdivctl.training import distributed

app = typer.Typer(
    name="fdivctl",
    help=(
        "LLM post-training in which the divergence is a first-class choice. "
        "Each command reads and writes files, so stages chain in shell scripts."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


#: the exception click raises for a bad command line (its message and exit code 2), taken from the click typer
#: runs on: typer ≥ 0.26 vendors its own copy of click, whose exceptions are not ``click``'s
USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fdivctl {__version__}")
        typer.echo(", ".join(f"{name} {version}" for name, version in library_versions().items()
                             if name != "fdivctl"))
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True,
        help="Print the version, and Python's and the libraries' that decide a run's numbers, and exit."
    ),
) -> None:
    """fdivctl: rollout → score → teacher-logits → train / distill → eval."""


# registered, and so listed by --help, in the order a pipeline runs them
divergences_cmd.register(app)
rollout_cmd.register(app)
score_cmd.register(app)
pairs_cmd.register(app)
teacher_logits_cmd.register(app)
distill_cmd.register(app)
train_cmd.register(app)
soup_cmd.register(app)
evaluate_cmd.register(app)
demo_cmd.register(app)
require_finite_floats(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning user errors into one line and exit code 2. A torchrun worker prints
    the Python stacks if it crashes in native code, and ends through :func:`distributed.end_worker`."""
    if not distributed.launched():
        _run(argv)
        return
    faulthandler.enable()
    code = 1
    try:
        _run(argv)
        code = 0
    except SystemExit as done:
        code = _exit_status(done)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 — a bug: its traceback, then exit 1 like an uncaught exception
        traceback.print_exc()
    distributed.end_worker(code)


def _exit_status(done: SystemExit) -> int:
    """The status ``sys.exit(code)`` gives the shell (a message is printed and gives 1)."""
    if done.code is None or isinstance(done.code, int):
        return done.code or 0
    print(done.code, file=sys.stderr)
    return 1


def _run(argv: list[str] | None) -> None:
    """Run one command; a UserError, or a full disk or a forbidden path (:func:`storage_failure`), ends it with
    one line and exit code 2."""
    try:
        code = app(args=argv, prog_name="fdivctl", standalone_mode=False)
    except UserError as err:
        typer.echo(f"fdivctl: error: {err}", err=True)
        sys.exit(2)
    except USAGE_ERROR as err:  # an unknown option, a missing argument, a value of the wrong type
        err.show()
        sys.exit(err.exit_code)
    except typer.Exit as err:
        sys.exit(err.exit_code)
    except typer.Abort:
        typer.echo("fdivctl: aborted", err=True)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 — a full disk or a forbidden path is one line; anything else is re-raised
        message = storage_failure(err)
        if message is None:
            raise
        typer.echo(f"fdivctl: error: {message}", err=True)
        sys.exit(2)
    # with standalone_mode=False click returns typer.Exit's code instead of raising it; 130 is typer's Ctrl-C
    if code == 130:
        typer.echo("fdivctl: interrupted; what the command had saved is kept (rollout, score, train and distill "
                   "continue with --resume, teacher-logits and eval --model when run again)", err=True)
    if isinstance(code, int) and code:
        sys.exit(code)
