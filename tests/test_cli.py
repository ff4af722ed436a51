"""The command line itself: a bad command line is click's usage message and exit 2, never a traceback."""

import os
import stat
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_runner import run_cli

from fdivctl import __version__


@pytest.mark.parametrize("args, message", [
    (["rollout", "--no-such-option"], "No such option: --no-such-option"),
    (["rollout", "model"], "Missing argument"),
    (["teacher-logits", "t", "s", "o", "--k", "many"], "Invalid value for '--k'"),
    (["no-such-command"], "No such command 'no-such-command'"),
    (["train", "p", "o", "--rollouts", "r", "--lr", "inf"], "Invalid value for '--lr': inf is not a finite number"),
    (["distill", "s", "o", "--data", "d", "--beta", "nan"], "Invalid value for '--beta': nan is not a finite number"),
    (["rollout", "m", "p", "o", "--temperature", "-inf"], "'--temperature': -inf is not a finite number"),
    (["train", "p", "o", "--rollouts", "r", "--lora-alpha", "nan"], "'--lora-alpha': nan is not a finite number"),
])
def test_a_bad_command_line_is_a_usage_error(args, message):
    done = run_cli(*args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "Usage: fdivctl" in done.stderr


def test_the_installed_entry_point_reports_usage_errors_the_same_way():
    done = subprocess.run([sys.executable, "-m", "fdivctl", "eval", "-o", "x"], capture_output=True, text=True)
    assert done.returncode == 2 and "No such option: -o" in done.stderr and "Traceback" not in done.stderr
    version = subprocess.run([sys.executable, "-m", "fdivctl", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.splitlines()[0] == f"fdivctl {__version__}"
    import torch
    import transformers
    assert f"torch {torch.__version__}, transformers {transformers.__version__}" in version.stdout.splitlines()[1]


def test_verify_of_a_directory_that_is_no_store_is_one_line_and_exit_2(tmp_path):
    done = run_cli("teacher-logits", "--verify", tmp_path / "nothing")
    assert done.returncode == 2
    assert done.stderr.strip() == f"fdivctl: error: {tmp_path / 'nothing'}: not a logit store (no manifest.json)"


def test_a_missing_column_is_named_in_one_line(tmp_path):
    pq.write_table(pa.table({"x": [1]}), tmp_path / "a.parquet")
    done = run_cli("merge", tmp_path / "m.parquet", tmp_path / "a.parquet", tmp_path / "a.parquet")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "missing columns 'prompt_id', 'sample_idx'; it has x" in done.stderr
    assert not (tmp_path / "m.parquet").exists()


def test_every_float_option_refuses_nan_and_inf():
    """cli.options.require_finite_floats reaches every float parameter of every command, shared options included."""
    import inspect

    from fdivctl.cli import app
    from fdivctl.cli.options import _finite

    floats = [(c.name, name, p.default) for c in app.registered_commands
              for name, p in inspect.signature(c.callback).parameters.items() if p.annotation in ("float", "float | None")]
    assert len(floats) > 40 and all(info.callback is _finite for _, _, info in floats)


@pytest.fixture
def outputs(tmp_path, tiny_teacher):
    """Inputs every command accepts, a file and a directory to misuse as outputs, and a path under the file."""
    from conftest import write_sequences

    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt_id": ["a"], "prompt": ["1+2="], "answer": ["3"]}), prompts)
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("not a directory")
    os.mkfifo(tmp_path / "fifo")
    return {"model": tiny_teacher, "prompts": prompts, "data": write_sequences(tmp_path / "s.parquet", 200, 2, 4, 4, 0),
            "dir": tmp_path / "dir", "file": tmp_path / "file", "under": tmp_path / "file" / "out",
            "fifo": tmp_path / "fifo", "null": "/dev/null", "stdout": "/dev/stdout"}


@pytest.mark.parametrize("args, misuse, message", [
    (["rollout", "{model}", "{prompts}", "{out}", "--device", "cpu"], "dir", "is a directory: give the output a file"),
    (["rollout", "{model}", "{prompts}", "{out}", "--device", "cpu"], "under", "is a file, so nothing can be written"),
    (["score", "{prompts}", "{out}"], "dir", "is a directory"),
    (["merge", "{out}", "{prompts}"], "dir", "is a directory"),
    (["teacher-logits", "{model}", "{data}", "{out}", "--k", "4", "--device", "cpu"], "file", "exists and is not a dir"),
    (["teacher-logits", "{model}", "{data}", "{out}", "--k", "4", "--device", "cpu"], "under", "is a file, so nothing"),
    (["distill", "{model}", "{out}", "--loss", "ce", "--data", "{data}", "--device", "cpu"], "file", "is not a directory"),
    (["train", "{model}", "{out}", "--algo", "sft", "--data", "{data}", "--device", "cpu"], "under", "is a file, so"),
    (["distill", "{model}", "{dir}/run", "--loss", "ce", "--data", "{data}", "--log-jsonl", "{out}", "--device", "cpu"],
     "dir", "is a directory"),
    (["eval", "{out}", "--run", "a={prompts}"], "file", "exists and is not a directory"),
    (["soup", "{model}", "{model}", "-o", "{out}"], "under", "is a file, so nothing"),
    (["demo", "run", "{out}"], "under", "is a file, so nothing"),
    # before: the atomic rename replaced the device's or the pipe's entry with a Parquet file
    (["rollout", "{model}", "{prompts}", "{out}", "--device", "cpu"], "null", "is not a regular file (a device or"),
    (["score", "{prompts}", "{out}"], "stdout", "/dev/stdout is not a regular file"),
    (["merge", "{out}", "{prompts}"], "fifo", "is not a regular file (a device or a pipe)"),
])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(outputs, args, misuse, message):
    """Before: tracebacks (NotADirectoryError, IsADirectoryError), rollout's only after every prompt was sampled."""
    done = run_cli(*(a.format(out=outputs[misuse], **outputs) for a in args))
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert sorted(p.name for p in outputs["dir"].iterdir()) == []
    assert outputs["file"].read_text() == "not a directory"
    assert stat.S_ISFIFO(os.stat(outputs["fifo"]).st_mode) and stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_json_lines_input_is_told_how_to_become_parquet(tmp_path, tiny_teacher):
    """The error's conversion command, run as given, makes the Parquet file the command then reads."""
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt_id": "a", "prompt": "Compute 1 + 2."}\n{"prompt_id": "b", "prompt": "Compute 2 + 2."}\n')
    done = run_cli("rollout", tiny_teacher, jsonl, tmp_path / "r.parquet", "--device", "cpu")
    assert done.returncode == 2 and "not a readable Parquet file" in done.stderr
    command = done.stderr.split("convert it with ", 1)[1].strip()
    subprocess.run(command, shell=True, check=True, cwd=tmp_path)
    converted = tmp_path / "prompts.parquet"
    done = run_cli("rollout", tiny_teacher, converted, tmp_path / "r.parquet", "--max-new-tokens", 4, "--device", "cpu")
    assert done.returncode == 0, done.stderr
