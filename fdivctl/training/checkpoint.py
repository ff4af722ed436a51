"""Checkpoints: a ``save_pretrained`` directory plus ``fdivctl_state/`` for exact resume.

Under LoRA the directory holds the merged weights and the adapter alone in
``adapter/`` (:mod:`fdivctl.training.lora`).

``fdivctl_state/state.pt`` holds the scheduler state, the step, the RNG
states and what the caller adds; ``fdivctl_state/optimizer/`` holds the
optimizer state as a ``torch.distributed.checkpoint`` directory that every
rank writes its own shard into (:func:`fdivctl.training.distributed.save_optimizer`),
and for a bf16/fp16 model ``fdivctl_state/master/`` its fp32 master weights
the same way (:mod:`fdivctl.training.master_weights`).
A checkpoint is written to a staging sibling directory and renamed into place,
so ``OUT`` always holds either the previous complete checkpoint or the new one
(DESIGN.md, "Checkpoints").  Under torchrun every rank must see ``OUT``'s
file system (one machine, or a shared file system across nodes).

``fdivctl_run/`` holds a run's own artifacts (an RL run's per-iteration
rollouts, cached reference log-probs); it is moved, not copied, from the
previous checkpoint into the new one, so it survives every save.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from fdivctl.training import lora

STATE_DIR = "fdivctl_state"
RUN_DIR = "fdivctl_run"
OPTIMIZER_DIR = "optimizer"
MASTER_DIR = "master"


def run_dir(out: Path) -> Path:
    """Where a run keeps its artifacts inside its checkpoint directory (created on demand)."""
    path = Path(out) / RUN_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def staging_dir(out: Path) -> Path:
    """The sibling directory a checkpoint of ``out`` is written into before it is renamed into place."""
    out = Path(out)
    return out.with_name(f".{out.name}.tmp")


def optimizer_dir(checkpoint: Path) -> Path:
    """Where a checkpoint (or its staging directory) keeps the sharded optimizer state."""
    return Path(checkpoint) / STATE_DIR / OPTIMIZER_DIR


def master_dir(checkpoint: Path) -> Path:
    """Where a checkpoint (or its staging directory) keeps the fp32 master weights of a bf16/fp16 model."""
    return Path(checkpoint) / STATE_DIR / MASTER_DIR


def begin_checkpoint(out: Path) -> None:
    """Rank 0: an empty staging directory for ``out`` (:func:`staging_dir`, with ``fdivctl_state/``)."""
    discard_checkpoint(out)
    (staging_dir(out) / STATE_DIR).mkdir(parents=True)


def discard_checkpoint(out: Path) -> None:
    """Rank 0: remove the staging directory of ``out`` left by a save that failed or was interrupted (it may
    hold gigabytes of weights), putting back first the run directory a save stopped after the move had moved."""
    out, tmp = Path(out), staging_dir(out)
    if (tmp / RUN_DIR).is_dir() and not (out / RUN_DIR).exists():
        out.mkdir(parents=True, exist_ok=True)
        (tmp / RUN_DIR).rename(out / RUN_DIR)
    shutil.rmtree(tmp, ignore_errors=True)


def finish_checkpoint(out: Path, model, tokenizer, scheduler, step: int, extra: dict,
                      model_state: dict | None = None) -> None:
    """Rank 0, after every rank wrote its optimizer shard into the staging directory: write the weights, the
    tokenizer and ``state.pt`` there, move the run directory in, and rename it into place as ``out``.

    ``model_state`` (a gathered full state dict) replaces the model's own.
    """
    out, tmp = Path(out), staging_dir(out)
    old = out.with_name(f".{out.name}.old")
    lora.save_pretrained(model, tmp, model_state)
    tokenizer.save_pretrained(tmp)
    state = {
        "step": step,
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        **extra,
    }
    with open(tmp / STATE_DIR / "state.pt", "wb") as stream:  # a Python stream: a full disk keeps its errno
        torch.save(state, stream)
    if (out / RUN_DIR).is_dir():
        (out / RUN_DIR).rename(tmp / RUN_DIR)
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def saved_state(out: Path) -> dict:
    """The checkpoint's ``state.pt`` as saved (step, scheduler, RNG states, what the stage saved with them)."""
    return torch.load(Path(out) / STATE_DIR / "state.pt", weights_only=False)


def load_state(out: Path) -> dict:
    """:func:`saved_state`, with the RNG states restored."""
    state = saved_state(out)
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return state


def has_state(out: Path) -> bool:
    return (Path(out) / STATE_DIR / "state.pt").is_file()
