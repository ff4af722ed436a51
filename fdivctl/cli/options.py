"""Option parsing shared by several commands."""

from __future__ import annotations

import inspect
import math
from typing import get_type_hints

import typer
from typer.models import ParameterInfo

from fdivctl.errors import UserError
from fdivctl.training import distributed

# training options of every command that updates a model (distill, train)
LORA_R = typer.Option(0, help="Train LoRA adapters of rank R on every linear layer of the decoder instead of all "
                      "weights (needs peft: pip install 'fdivctl\\[lora]'); OUT holds the merged model plus "
                      "OUT/adapter (a peft adapter). 0: full fine-tuning.")
LORA_ALPHA = typer.Option(None, help="LoRA scale α (the update is (α/r)·BA); default 2·r.")
LORA_DROPOUT = typer.Option(0.0, help="Dropout on the LoRA branch's input.")
DIST_BACKEND = typer.Option("auto", help="Under torchrun (torchrun --nproc-per-node N -m fdivctl …): the "
                            "process-group backend, nccl, gloo, or auto (nccl on CUDA, gloo on CPUs).")
CHUNK_SIZE = typer.Option(None, help="Token rows per chunk of each head's [rows, vocab] pass (the trained "
                          "model's, and a reference's or teacher's token log-probs), the largest buffers (memory vs "
                          "speed; the update is the same; default about 2^26 logits per chunk on CUDA, 2^22 on the "
                          "CPU).")
TRAIN_DTYPE = typer.Option("auto", help="Model dtype: auto (the checkpoint's on CUDA, fp32 on the CPU), fp32, bf16, "
                           "fp16. A bf16/fp16 model computes in that dtype and AdamW updates fp32 master copies of "
                           "its weights (saved with each checkpoint).")
MAX_GRAD_NORM = typer.Option(1.0, help="Clip the gradient's global L2 norm to this before each optimizer step "
                             "(0: no clipping; the norm is logged either way).")
GRAD_CHECKPOINTING = typer.Option(False, help="Recompute decoder activations in backward: less memory, about one "
                                  "more forward of compute.")
GROUP_BY_LENGTH = typer.Option(False, help="Fixed sequences: fill each step with examples of similar length "
                               "(sorted 50 steps at a time, the steps shuffled again; HF's group_by_length), so a "
                               "batch pads little: faster on data of mixed lengths, another order of examples.")
TENSORBOARD = typer.Option(None, help="Write each step's record (what --log-jsonl holds) to this TensorBoard log "
                           "directory: its numeric fields as scalars by step (needs `pip install tensorboard`); a "
                           "resumed run drops the steps after its checkpoint there, as in the JSONL.")


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def require_finite_floats(app: typer.Typer) -> None:
    """Every float option and argument of ``app``'s commands refuses nan and ±inf as a usage error (exit 2)
    before the command runs: no stage has a meaning for them (an infinite --lr or a NaN --beta would train
    to NaN weights and save them). Range checks stay with each stage."""
    for command in app.registered_commands:
        hints = get_type_hints(command.callback)
        for name, parameter in inspect.signature(command.callback).parameters.items():
            info = parameter.default
            if hints.get(name) in (float, float | None) and isinstance(info, ParameterInfo) and info.callback is None:
                info.callback = _finite


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"i/n"`` → (i, n); no spec: (RANK, WORLD_SIZE) under torchrun (each process on its local GPU), else (0, 1)."""
    if spec is None:
        return distributed.env_shard()
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise UserError(f"--shard {spec!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise UserError(f"--shard {spec}: need 0 ≤ i < n")
    return i, n
