"""What a resumed run must share with the run it continues.

A checkpoint records the settings of the run that wrote it (``state.pt``,
key ``run_settings``): every option of the stage, flattened to dotted names,
and each input file or model directory by content, not by path (a run moved
to another machine resumes; a run given other data does not).  ``--resume``
compares them with the new command's and refuses a difference, naming it:
resuming with another loss, batch size or data would silently splice two
runs into one checkpoint whose numbers no single command reproduces.

Options that change how the run executes but not what it computes may differ
(:data:`MAY_CHANGE`), as may the run's length: a run is extended by resuming
with a larger ``--max-steps``, ``--epochs`` or ``--iterations``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from pathlib import Path

from fdivctl.errors import UserError
from fdivctl.io.atomic import check_output_dir, check_output_file
from fdivctl.io.hashing import file_fingerprint, model_hash
from fdivctl.training.checkpoint import has_state, saved_state

# leaf option names a resumed run may change: the run's length, where it logs and saves, and the execution
# (device, process group, activation recomputation, micro-batching and the sampling engine: same math)
MAY_CHANGE = frozenset({
    "max_steps", "epochs", "iterations", "save_every", "eval_every", "eval_data", "eval_logits", "log_jsonl",
    "tensorboard",
    "resume", "device", "dist_backend", "grad_checkpointing", "micro_batch_size", "score_workers", "score_timeout",
    "backend", "chunk_size", "run_settings",
})


def run_settings(options, **inputs) -> dict[str, object]:
    """``options`` (a dataclass, nested ones included) and the named ``inputs`` (paths, dataclasses, values) as
    one flat, comparable dict."""
    flat: dict[str, object] = {}
    _flatten("", {**dataclasses.asdict(options), **inputs}, flat)
    return {key: value for key, value in flat.items() if key.rsplit(".", 1)[-1] not in MAY_CHANGE}


def begin_run(out: Path, loop, settings: dict[str, object]) -> None:
    """Give the run's ``settings`` to its loop options (every checkpoint saves them); with ``--resume`` and a
    checkpoint in ``out``, first refuse settings other than the ones it saved; refuse an ``out`` that cannot be a
    directory, a ``--log-jsonl`` that cannot be a file, or a ``--tensorboard`` without its package, before any work."""
    check_output_dir(out)
    if loop.log_jsonl is not None:
        check_output_file(loop.log_jsonl, stream_ok=True)
    if loop.tensorboard is not None:
        check_output_dir(loop.tensorboard)
        try:
            import torch.utils.tensorboard  # noqa: F401 - needs the tensorboard package
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard "
                            "(or fdivctl[tensorboard])") from None
    if loop.resume and has_state(out):
        check_same_run(out, saved_state(out).get("run_settings"), settings)
    loop.run_settings = settings


def check_same_run(out: Path, saved: Mapping[str, object] | None, current: Mapping[str, object]) -> None:
    """Refuse to resume the run in ``out`` with settings other than those it was started with.

    ``saved`` is None for a checkpoint written before runs recorded their settings: nothing to compare.
    """
    if saved is None:
        return
    differing = sorted(key for key in set(saved) | set(current) if _differs(key, saved, current))
    if differing:
        changes = "; ".join(f"{key}: {_shown(saved.get(key))} → {_shown(current.get(key))}" for key in differing[:6])
        more = f" (and {len(differing) - 6} more)" if len(differing) > 6 else ""
        raise UserError(f"--resume: {out} was started with other settings ({changes}{more}); resume with the "
                        "run's own settings, or start a new run in another directory from its weights")


#: the values of an option left at its default that keeps the earlier behaviour (off, none, empty)
_OFF = (None, False, "", [])


def _differs(key: str, saved: Mapping[str, object], current: Mapping[str, object]) -> bool:
    """Whether setting ``key`` differs.  An option that one side's fdivctl did not have (added, or removed, since
    the checkpoint was written) differs only when the side that has it sets it on: a new option comes with a
    default that keeps the earlier behaviour, so a run continues across an upgrade."""
    if key not in saved or key not in current:
        return (saved if key in saved else current)[key] not in _OFF
    return saved[key] != current[key]


def _flatten(prefix: str, value, flat: dict[str, object]) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}{key}.", item, flat)
        return
    flat[prefix.rstrip(".")] = _identity(value)


def _identity(value):
    """A path by its content (a file's fingerprint, a model directory's hash, a store by its JSON files); lists
    element by element; everything else as it is."""
    if isinstance(value, (list, tuple)):
        return [_identity(item) for item in value]
    if not isinstance(value, Path):
        return value
    if value.is_file():
        return f"file {file_fingerprint(value)}"
    if (value / "config.json").is_file():
        return f"model {model_hash(value)}"
    if value.is_dir():  # a logit store or a DPH partition: its JSON records name everything it holds
        listing = ",".join(f"{p.name}={file_fingerprint(p)}" for p in sorted(value.glob("*.json")))
        return f"dir {hashlib.sha256(listing.encode()).hexdigest()}"
    return str(value)


def _shown(value) -> str:
    """A setting as the message shows it: a path's content hash shortened."""
    if isinstance(value, list):
        return "[" + ", ".join(map(_shown, value)) + "]"
    if isinstance(value, str) and value.startswith(("file ", "model ", "dir ")):
        kind, digest = value.split(" ", 1)
        return f"{kind} {digest[:12]}…"
    return repr(value)
