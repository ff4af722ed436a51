"""Read what a run wrote: its JSON-lines log and its checkpoint's weights; run a staged ``train``."""

import json
from pathlib import Path

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
