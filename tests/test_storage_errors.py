"""A full disk or a file-size limit ends a command with one line naming the file, exit 2, and nothing half-written.

The failure is real: each command runs in a process whose file-size limit (``ulimit -f``, with SIGXFSZ ignored)
makes the kernel refuse the write with EFBIG, as a full disk refuses it with ENOSPC.  Before, each ended in a
traceback from pyarrow, safetensors or torch.distributed.checkpoint, and a failed checkpoint left its staging
directory (a copy of the weights) behind.
"""

import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from cli_runner import run_cli
from conftest import write_sequences

from fdivctl.training.checkpoint import saved_state, staging_dir


def _limited(limit_bytes: int, *args) -> subprocess.CompletedProcess:
    """``python -m fdivctl ARGS`` unable to write a file past ``limit_bytes``."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "fdivctl", *map(str, args)], capture_output=True, text=True,
                          preexec_fn=limit)


def _one_line(done: subprocess.CompletedProcess, path) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    line = done.stderr.strip()
    assert line.startswith(f"fdivctl: error: {path}") and "file too large: raise the file-size limit" in line, line
    return line


def test_rollout_names_the_part_it_could_not_write(tmp_path, tiny_teacher):
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt_id": [f"q{i}" for i in range(8)], "prompt": ["Compute 1 + 2."] * 8}), prompts)
    out = tmp_path / "r.parquet"
    done = _limited(2048, "rollout", tiny_teacher, prompts, out, "--n", 4, "--max-new-tokens", 8, "--device", "cpu")
    _one_line(done, out.with_name("r.parquet.parts") / "part-000000.parquet")
    assert not out.exists() and not list(out.with_name("r.parquet.parts").glob("part-*"))


def test_teacher_logits_names_the_shard_and_leaves_no_partial_one(tmp_path, tiny_teacher):
    seqs = write_sequences(tmp_path / "seqs.parquet", 200, 8, 4, 6, seed=0)
    out = tmp_path / "logits"
    done = _limited(2048, "teacher-logits", tiny_teacher, seqs, out, "--k", 16, "--dtype", "fp32", "--device", "cpu")
    _one_line(done, out / "shard-00000.safetensors")
    assert not list(out.glob("*.safetensors")) and not list(out.glob(".*.tmp"))


def test_a_checkpoint_that_cannot_be_written_keeps_the_previous_one(tmp_path, student, tiny_teacher):
    data = write_sequences(tmp_path / "data.parquet", 200, 8, 4, 6, seed=0)
    out = tmp_path / "out"
    args = ["distill", student, out, "--teacher", tiny_teacher, "--data", data, "--batch-size", 2, "--device", "cpu"]
    run_cli(*args, "--max-steps", 2, check=True)
    before = (out / "model.safetensors").read_bytes()
    done = _limited(64 * 1024, *args, "--max-steps", 4, "--resume")
    assert "no output was left half-written" in _one_line(done, out).lower()
    assert not staging_dir(out).exists()  # the failed save's copy of the weights is gone
    assert saved_state(out)["step"] == 2 and (out / "model.safetensors").read_bytes() == before
    resumed = run_cli(*args, "--max-steps", 4, "--resume")  # space again: the run goes on from step 2
    assert resumed.returncode == 0, resumed.stderr
    assert saved_state(out)["step"] == 4


def test_a_resumed_run_logs_each_step_once(tmp_path, student, tiny_teacher):
    """A crash after the checkpoint at step 2 had logged steps 3 and 4 (and half a line): the resumed run redoes
    them, and the log holds steps 1 … 4 once each (before: 1, 2, 3, 4, the cut line, 3, 4)."""
    data = write_sequences(tmp_path / "data.parquet", 200, 8, 4, 6, seed=0)
    out, log = tmp_path / "out", tmp_path / "log.jsonl"
    args = ["distill", student, out, "--teacher", tiny_teacher, "--data", data, "--batch-size", 2, "--device", "cpu",
            "--log-jsonl", log]
    run_cli(*args, "--max-steps", 2, check=True)
    kept = log.read_text()
    with log.open("a") as crashed:
        crashed.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + json.dumps({"step": 4, "loss": 1.0}) + "\n")
        crashed.write('{"step": 5, "lo')
    run_cli(*args, "--max-steps", 4, "--resume", check=True)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert log.read_text().startswith(kept) and records[2]["loss"] != 1.0
    # a new run in a new directory with the same log path starts the log afresh
    run_cli(*[tmp_path / "fresh" if a == out else a for a in args], "--max-steps", 1, check=True)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1]


def test_storage_failure_reads_the_errno_wherever_the_library_put_it():
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    from fdivctl.errors import storage_failure

    try:
        raise OSError(28, "No space left on device")
    except OSError as err:
        wrapped = CheckpointException("save failed", {0: _wrap_exception(err)})
    assert storage_failure(wrapped, "out").startswith("out: no space left on device: free space there")
    rust = RuntimeError("Error while serializing: I/O error: Disk quota exceeded (os error 122)")
    assert storage_failure(rust, "s.safetensors").startswith("s.safetensors: disk quota exceeded: free space in")
    assert storage_failure(OSError(2, "No such file or directory")) is None  # a bug's traceback stays
    assert storage_failure(torch.cuda.OutOfMemoryError("CUDA out of memory")) is None


def test_a_log_on_a_stream_is_appended_to_never_replaced(tmp_path, student, tiny_teacher):
    """--log-jsonl /dev/stdout streams the records (a resumed or new run's rewrite is for regular files only: the
    atomic rename would have replaced /dev/stdout itself)."""
    data = write_sequences(tmp_path / "data.parquet", 200, 8, 4, 6, seed=0)
    args = ["distill", student, tmp_path / "out", "--teacher", tiny_teacher, "--data", data, "--batch-size", 2,
            "--max-steps", 2, "--device", "cpu", "--log-jsonl", "/dev/stdout"]
    done = subprocess.run([sys.executable, "-m", "fdivctl", *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["step"] for line in done.stdout.splitlines()[:2]] == [1, 2]
    assert Path("/dev/stdout").is_symlink()
