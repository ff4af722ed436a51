"""Ctrl-C during training: the run finishes its step (or iteration), checkpoints it and exits 130; --resume goes on.

Before: a KeyboardInterrupt ended the process with nothing saved unless --save-every had happened to fire.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
from cli_runner import ctrl_c_reaches_it
from conftest import write_sequences

from fdivctl.training.checkpoint import saved_state


def _interrupt_after(args: list, log, records: int, preexec=ctrl_c_reaches_it) -> subprocess.CompletedProcess:
    """Run ``python -m fdivctl ARGS`` (``preexec`` in the child first); send SIGINT once ``log`` has ``records``
    lines; wait for it to end."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "fdivctl", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, preexec_fn=preexec)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= records:
            process.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(args, process.returncode, out, err)


def _records(log) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_ctrl_c_checkpoints_the_last_step_and_resume_goes_on(tmp_path, student, tiny_teacher):
    data = write_sequences(tmp_path / "data.parquet", 200, 8, 4, 6, seed=0)
    out, log = tmp_path / "out", tmp_path / "log.jsonl"
    args = ["distill", student, out, "--teacher", tiny_teacher, "--data", data, "--batch-size", 2,
            "--lr-schedule", "constant", "--device", "cpu", "--log-jsonl", log]
    done = _interrupt_after([*args, "--max-steps", 100_000], log, 3)
    assert done.returncode == 130, done.stderr
    steps = len(_records(log))
    assert steps >= 3 and saved_state(out)["step"] == steps
    assert f"stopped after step {steps}: checkpoint in {out}; run the same command with --resume" in done.stderr
    assert "Traceback" not in done.stderr
    resumed = subprocess.run([sys.executable, "-m", "fdivctl", *map(str, [*args, "--max-steps", steps + 2, "--resume"])],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in _records(log)] == list(range(1, steps + 3))


def test_a_run_started_with_sigint_ignored_keeps_ignoring_it(tmp_path, student, tiny_teacher):
    """A background job of a shell without job control starts with SIGINT ignored; the run leaves it ignored and
    finishes (before: its own Ctrl-C handler replaced the ignore, so a SIGINT meant for the shell stopped it)."""
    data = write_sequences(tmp_path / "data.parquet", 200, 8, 4, 6, seed=0)
    log = tmp_path / "log.jsonl"
    done = _interrupt_after(["distill", student, tmp_path / "out", "--teacher", tiny_teacher, "--data", data,
                             "--batch-size", 2, "--device", "cpu", "--log-jsonl", log, "--max-steps", 12], log, 2,
                            preexec=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert done.returncode == 0, done.stderr
    assert len(_records(log)) == 12 and "interrupted" not in done.stderr


def test_ctrl_c_in_online_rl_checkpoints_the_last_iteration(tmp_path, tiny_teacher):
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt_id": [f"q{i}" for i in range(4)], "prompt": ["1+2=", "2+2=", "3+1=", "1+1="],
                             "answer": ["^3", "^4", "^4", "^2"]}), prompts)
    out, log = tmp_path / "rl", tmp_path / "rl.jsonl"
    done = _interrupt_after(["train", tiny_teacher, out, "--prompts", prompts, "--verifier", "regex",
                             "--iterations", 1000, "--group-size", 2, "--prompts-per-iteration", 2,
                             "--max-new-tokens", 4, "--device", "cpu", "--log-jsonl", log], log, 2)
    assert done.returncode == 130, done.stderr
    iterations = len(_records(log))
    assert saved_state(out)["iteration"] == iterations
    assert f"stopped after iteration {iterations}" in done.stderr
