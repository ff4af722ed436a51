"""Read what a run wrote: its JSON-lines log and its checkpoint's weights; run a staged ``train``."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.torch import load_file

from cli_runner import run_cli
from fdivctl.io.checkpoints import load_causal_lm

#: the options every staged method test trains with
STAGED = ["--lr", "1e-3", "--device", "cpu", "--micro-batch-size", 16]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def weights(checkpoint: Path) -> dict:
    return load_file(str(Path(checkpoint) / "model.safetensors"))


def staged_run(task: Path, rollouts: Path, out: Path, *extra) -> list[dict]:
    """``train`` the demo task's SFT policy on ``rollouts`` into ``out``; checks the checkpoint loads and returns
    the per-step log."""
    log = out.parent / f"{out.name}.jsonl"
    run_cli("train", task / "sft", out, "--rollouts", rollouts, *STAGED, *extra, "--log-jsonl", log, check=True)
    assert load_causal_lm(out, device="cpu") is not None
    return read_jsonl(log)


def dph_prompts(task: Path, path: Path) -> Path:
    """The demo task's prompts with regex answers: even rows always right ('^'), odd rows never ('^NEVER$'), so a
    DPH partition puts the even half in D_pef and the odd half in D_exp."""
    table = pq.read_table(task / "data" / "prompts.parquet")
    answers = ["^" if i % 2 == 0 else "^NEVER$" for i in range(table.num_rows)]
    pq.write_table(table.set_column(table.column_names.index("answer"), "answer", pa.array(answers)), path)
    return path


def check_dph_partition(prompts: Path, partition: Path, k: int) -> dict:
    """Check a partition of :func:`dph_prompts` and return its record."""
    record = json.loads((partition / "partition.json").read_text())
    n = pq.read_table(prompts).num_rows
    assert record["pef_prompts"] == (n + 1) // 2 and record["exp_prompts"] == n // 2
    reference = pq.read_table(partition / "reference.parquet")
    assert reference.num_rows == record["pef_prompts"] * (k + 1)  # k + 1 correct samples each
    assert set(reference.column("prompt_id").to_pylist()) == set(record["pef_prompt_ids"])
    assert pq.read_table(partition / "exp_prompts.parquet").num_rows == n // 2
    assert pq.read_table(partition / "presample.scored.parquet").num_rows == n * (k + 1)
    return record
