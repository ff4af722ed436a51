"""A single-process optimization loop over a fixed list of examples.

AdamW; learning rate with linear warm-up then constant, linear or cosine
decay; gradient accumulation; gradient clipping; a deterministic example
order (epoch e shuffles with ``seed + e``) so that resuming at step s replays
exactly what an uninterrupted run would do.  A non-finite loss stops the run
with the last good checkpoint kept.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fdivctl.errors import UserError
from fdivctl.training.checkpoint import has_state, load_state, save_checkpoint

SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class LoopOptions:
    lr: float = 1e-4
    lr_schedule: str = "cosine"
    warmup: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: int = 1
    seed: int = 0
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    save_every: int = 0  # 0: only at the end
    log_jsonl: Path | None = None
    resume: bool = False

    def check(self) -> None:
        if self.lr_schedule not in SCHEDULES:
            raise UserError(f"--lr-schedule {self.lr_schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.epochs < 1:
            raise UserError("--batch-size, --grad-accum and --epochs must be ≥ 1")
        if not self.lr > 0 or self.warmup < 0:
            raise UserError("--lr must be > 0 and --warmup ≥ 0")


def _lr_lambda(opts: LoopOptions, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < opts.warmup:
            return (step + 1) / opts.warmup
        if opts.lr_schedule == "constant":
            return 1.0
        progress = (step - opts.warmup) / max(1, total - opts.warmup)
        if opts.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def batches_for_step(n_examples: int, step: int, opts: LoopOptions) -> list[list[int]]:
    """The ``grad_accum`` micro-batches (example indices) of optimizer step ``step``."""
    per_step = opts.batch_size * opts.grad_accum
    per_epoch = max(1, n_examples // per_step)
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(opts.seed + epoch)).tolist()
    chunk = order[offset * per_step : (offset + 1) * per_step]
    return [chunk[i : i + opts.batch_size] for i in range(0, len(chunk), opts.batch_size)]


def total_steps(n_examples: int, opts: LoopOptions) -> int:
    per_epoch = max(1, n_examples // (opts.batch_size * opts.grad_accum))
    return opts.max_steps if opts.max_steps is not None else per_epoch * opts.epochs


def run_loop(
    model,
    tokenizer,
    n_examples: int,
    loss_fn: Callable[[list[int], int, int], tuple[torch.Tensor, dict]],
    out: Path,
    opts: LoopOptions,
    on_step: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Optimize ``loss_fn(example indices, step, total steps) → (loss, figures)``; checkpoint into ``out``."""
    opts.check()
    total = total_steps(n_examples, opts)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(opts, total))
    step = 0
    if opts.resume and has_state(out):
        state = load_state(out)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: pass --resume to continue it, or choose a new directory")
    log = open(opts.log_jsonl, "a") if opts.log_jsonl else None
    last: dict = {}
    try:
        while step < total:
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            figures_sum: dict[str, float] = {}
            micro = batches_for_step(n_examples, step, opts)
            for indices in micro:
                loss, figures = loss_fn(indices, step, total)
                if not torch.isfinite(loss):
                    kept = f"{out} keeps the last good checkpoint" if has_state(out) else "no checkpoint was written yet"
                    raise UserError(f"non-finite loss at step {step + 1}: stopped; {kept}")
                (loss / len(micro)).backward()
                for key, value in figures.items():
                    share = 1 if key == "tokens" else len(micro)  # tokens add up, the rest average
                    figures_sum[key] = figures_sum.get(key, 0.0) + value / share
            grad_norm = torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            seconds = time.perf_counter() - start
            last = {"step": step, **figures_sum, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": figures_sum.get("tokens", 0.0) / seconds}
            if log:
                log.write(json.dumps(last) + "\n")
                log.flush()
            if opts.save_every and step % opts.save_every == 0 and step < total:
                save_checkpoint(out, model, tokenizer, optimizer, scheduler, step, {})
            if on_step:
                on_step(step, total, last)
    finally:
        if log:
            log.close()
    save_checkpoint(out, model, tokenizer, optimizer, scheduler, step, {})
    return {"steps": step, **last}
