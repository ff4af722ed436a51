"""Checkpoints: a ``save_pretrained`` directory plus ``fdivctl_state/`` for exact resume.

Under LoRA the directory holds the merged weights and the adapter alone in
``adapter/`` (:mod:`fdivctl.training.lora`).

``fdivctl_state/state.pt`` holds the optimizer and scheduler states, the step,
and the RNG states.  A checkpoint is written to a temporary sibling directory
and renamed into place, so ``OUT`` always holds either the previous complete
checkpoint or the new one (DESIGN.md, "Checkpoints").

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


def run_dir(out: Path) -> Path:
    """Where a run keeps its artifacts inside its checkpoint directory (created on demand)."""
    path = Path(out) / RUN_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_checkpoint(out: Path, model, tokenizer, optimizer_state: dict, scheduler, step: int, extra: dict,
                    model_state: dict | None = None) -> None:
    """Write ``out`` atomically; ``model_state`` (a gathered full state dict) replaces the model's own."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    old = out.with_name(f".{out.name}.old")
    if (tmp / RUN_DIR).is_dir() and not (out / RUN_DIR).exists():  # a save interrupted after the move
        out.mkdir(parents=True, exist_ok=True)
        (tmp / RUN_DIR).rename(out / RUN_DIR)
    shutil.rmtree(tmp, ignore_errors=True)
    lora.save_pretrained(model, tmp, model_state)
    tokenizer.save_pretrained(tmp)
    (tmp / STATE_DIR).mkdir()
    torch.save(
        {
            "step": step,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
            **extra,
        },
        tmp / STATE_DIR / "state.pt",
    )
    if (out / RUN_DIR).is_dir():
        (out / RUN_DIR).rename(tmp / RUN_DIR)
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def load_state(out: Path) -> dict:
    state = torch.load(Path(out) / STATE_DIR / "state.pt", weights_only=False)
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return state


def has_state(out: Path) -> bool:
    return (Path(out) / STATE_DIR / "state.pt").is_file()
