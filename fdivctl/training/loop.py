"""Single-process optimization: the optimizer state and the loop over a fixed example list.

:class:`Trainer` owns AdamW, the learning-rate schedule (linear warm-up then
constant, linear or cosine decay over ``total`` schedule units), gradient
accumulation, clipping and checkpoints; every command that updates a model
goes through it.  :func:`run_loop` drives it over a fixed list of examples
with a deterministic order (epoch e shuffles with ``seed + e``), so resuming
at step s replays exactly what an uninterrupted run would do.  A non-finite
loss stops the run with the last good checkpoint kept; Ctrl-C stops it with a
checkpoint of the last finished step (:class:`Interruption`).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fdivctl.errors import UserError, storage_failures_named
from fdivctl.io.atomic import atomic_path
from fdivctl.training import distributed
from fdivctl.training.checkpoint import (
    RUN_DIR,
    begin_checkpoint,
    discard_checkpoint,
    finish_checkpoint,
    has_state,
    load_state,
    master_dir,
    optimizer_dir,
    staging_dir,
)
from fdivctl.training.lora import LoraOptions, add_adapters, check_resume
from fdivctl.training.master_weights import MasterWeights

SCHEDULES = ("constant", "linear", "cosine")

#: a micro-batch's loss closure: () → (loss, figures); the step's loss and figures are the sums over its closures
MicroBatch = Callable[[], tuple[torch.Tensor, dict]]


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
    tensorboard: Path | None = None  # a TensorBoard log directory for the same records (MetricsLog)
    resume: bool = False
    grad_checkpointing: bool = False  # recompute each decoder layer's activations in backward
    eval_every: int = 0  # steps between held-out evaluations (0: none); run_loop's ``evaluate``
    dist_backend: str = "auto"  # under torchrun: nccl, gloo, or auto (nccl on CUDA)
    lora: LoraOptions = field(default_factory=LoraOptions)  # r > 0: train LoRA adapters only
    group_by_length: bool = False  # each step's examples of similar length (batches_for_step)
    # what the stage computes (run_settings.begin_run); every checkpoint saves it, --resume compares it
    run_settings: dict | None = None

    def check(self) -> None:
        if self.lr_schedule not in SCHEDULES:
            raise UserError(f"--lr-schedule {self.lr_schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.epochs < 1:
            raise UserError("--batch-size, --grad-accum and --epochs must be ≥ 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max-steps must be ≥ 1 (leave it out for --epochs over the data), got {self.max_steps}")
        if not self.lr > 0 or self.warmup < 0:
            raise UserError("--lr must be > 0 and --warmup ≥ 0")
        if not self.max_grad_norm >= 0:  # a negative norm would flip the gradient's sign in the clipping
            raise UserError(f"--max-grad-norm must be ≥ 0 (0: no clipping), got {self.max_grad_norm}")
        if self.eval_every < 0 or self.save_every < 0:
            raise UserError("--eval-every and --save-every must be ≥ 0")
        self.lora.check()


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


def check_fresh_output(out: Path, resume: bool) -> None:
    """Refuse to start a new run in a non-empty directory (``resume`` continues one instead)."""
    if not resume and Path(out).exists() and any(Path(out).iterdir()):
        raise UserError(f"{out} exists and is not empty: pass --resume to continue it, or choose a new directory")


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (non-reentrant torch.utils.checkpoint); no KV cache.

    transformers 5.x names it ``activation_checkpointing_enable``; 4.x ``gradient_checkpointing_enable``.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


class Trainer:
    """AdamW + schedule + checkpoints of one model in ``out``.

    ``total`` is the length of the learning-rate schedule in the caller's units
    (optimizer steps for :func:`run_loop`, iterations for online RL): the caller
    advances it with :meth:`advance_schedule`.  With ``opts.resume`` and a
    checkpoint in ``out`` the optimizer, schedule, step and RNG are restored and
    :attr:`state` holds what the caller saved with it.  ``out`` may already
    hold this run's ``fdivctl_run/`` (a stage that writes it first checks
    :func:`check_fresh_output`).  With ``opts.lora`` the model gets LoRA adapters
    here (in place) and only they are trained; the caller loads the base weights
    (:func:`fdivctl.training.lora.weights_to_load`) and a resumed run gets its
    adapter back from ``out``.  Under torchrun the decoder layers are sharded
    here with FSDP2 and every rank takes part in each step and save
    (:mod:`fdivctl.training.distributed`).
    """

    def __init__(self, model, tokenizer, out: Path, opts: LoopOptions, total: int):
        opts.check()
        self.model, self.tokenizer, self.out, self.opts = model, tokenizer, Path(out), opts
        resuming = opts.resume and has_state(self.out)
        self.world = distributed.current()
        if opts.lora.enabled:
            add_adapters(model, opts.lora, self.out if resuming else None, seed=opts.seed)
        elif resuming:
            check_resume(self.out, opts.lora)
        if opts.grad_checkpointing:
            enable_activation_checkpointing(model)
        if self.world.distributed:
            distributed.shard(model, self.world)
        self.params = [p for p in model.parameters() if p.requires_grad]
        # a bf16/fp16 model is updated through fp32 copies (master_weights.py); the optimizer state is named by
        # the module that holds what it updates
        self.masters = MasterWeights(model) if MasterWeights.needed(model) else None
        self.updated = self.masters.params if self.masters else self.params
        self.optimizer_owner = self.masters.module if self.masters else model
        self.optimizer = torch.optim.AdamW(self.updated, lr=opts.lr, weight_decay=opts.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(opts, total))
        self.total = total
        self.step = 0
        self._saved_at: int | None = None  # the schedule position of the last checkpoint this process wrote
        self.state: dict = {}
        if resuming:
            self.state = load_state(self.out)
            if "optimizer" in self.state:  # a checkpoint from before the sharded optimizer state
                distributed.load_full_optimizer_state(self.optimizer_owner, self.optimizer, self.state.pop("optimizer"))
            else:
                distributed.load_optimizer(self.optimizer_owner, self.optimizer, optimizer_dir(self.out))
            if self.masters and master_dir(self.out).is_dir():  # else: copies of the saved (rounded) weights
                distributed.load_tensors(self.masters.copies, master_dir(self.out))
            self.scheduler.load_state_dict(self.state["scheduler"])
            self.step = self.state["step"]
        elif self.out.exists() and any(p.name != RUN_DIR for p in self.out.iterdir()):
            check_fresh_output(self.out, resume=False)

    def update(self, micro_batches: Iterable[MicroBatch],
               rescale: Callable[[dict[str, float]], float] | None = None) -> dict:
        """One optimizer step on the sum of the micro-batches' losses (the caller scales them).

        ``rescale``, when given, runs after the last micro-batch's backward with the summed figures: it may change
        them in place, and the factor it returns multiplies every gradient before clipping (a scale only known
        once the micro-batches ran: :class:`StepTokenMean`).

        Returns the step's figures: the sums of the micro-batches' figures,
        ``grad_norm``, ``lr``, ``tokens_per_s``.
        """
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)
        figures: dict[str, float] = {}
        for micro in micro_batches:
            loss, parts = micro()
            if not distributed.all_finite(loss, self.world):
                kept = f"{self.out} keeps the last good checkpoint" if has_state(self.out) else \
                    "no checkpoint was written yet"
                raise UserError(f"non-finite loss at step {self.step + 1}: stopped; {kept}")
            loss.backward()
            for key, value in parts.items():
                figures[key] = figures.get(key, 0.0) + value
        distributed.average_replicated_grads(self.params, self.world)
        if self.masters:
            self.masters.take_grads()
        if rescale is not None:
            factor = rescale(figures)
            for param in self.updated:
                if param.grad is not None:
                    param.grad.mul_(factor)
        grad_norm = distributed.clip_grad_norm(self.updated, self.opts.max_grad_norm or math.inf, self.world)
        self.optimizer.step()
        if self.masters:
            self.masters.to_model()
        self.step += 1
        figures = distributed.mean_figures(figures, self.world)
        seconds = time.perf_counter() - start
        return {**figures, "grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0],
                "tokens_per_s": figures.get("tokens", 0.0) / seconds}

    @property
    def progress(self) -> float:
        """The share of the schedule done, in [0, 1] (for coefficients annealed over the run)."""
        return min(1.0, self.scheduler.last_epoch / max(1, self.total))

    def advance_schedule(self) -> None:
        self.scheduler.step()

    def save(self, extra: dict | None = None) -> None:
        """Checkpoint into ``out``: every rank writes its optimizer shard; the weights, gathered, and the rest are
        written by rank 0, which then renames the staging directory into place."""
        model_state = distributed.model_state(self.model) if self.world.distributed else None
        try:
            with storage_failures_named(self.out):
                if self.world.main:
                    begin_checkpoint(self.out)
                distributed.barrier(self.world)
                distributed.save_optimizer(self.optimizer_owner, self.optimizer, optimizer_dir(staging_dir(self.out)))
                if self.masters:
                    distributed.save_tensors(self.masters.copies, master_dir(staging_dir(self.out)))
                if self.world.main:
                    finish_checkpoint(self.out, self.model, self.tokenizer, self.scheduler, self.step,
                                      {"run_settings": self.opts.run_settings, **(extra or {})}, model_state)
        except BaseException:  # the previous checkpoint stays; the half-written one goes
            if self.world.main:
                discard_checkpoint(self.out)
            raise
        distributed.barrier(self.world)
        self._saved_at = self.scheduler.last_epoch

    @property
    def saved(self) -> bool:
        """Whether the last checkpoint holds the run as it is now (nothing advanced the schedule since)."""
        return self._saved_at == self.scheduler.last_epoch


class Interruption:
    """Ctrl-C during training, as a context around a loop.

    The first SIGINT lets the current step (or online iteration: ``unit``) finish; then
    :meth:`save_if_asked` checkpoints it and ends the command with exit status 130, and the same command
    with ``--resume`` continues from there.  A second SIGINT stops at once, without a checkpoint.  Only in
    a single process's main thread: under torchrun the ranks would see the signal at different steps and
    could not save together, so Ctrl-C stops them at once as before.  A process started with SIGINT ignored (a
    background job of a shell without job control) keeps ignoring it.
    """

    def __init__(self, trainer: Trainer, unit: str = "step"):
        self.trainer, self.unit = trainer, unit
        self.asked = False
        self._previous = None

    def __enter__(self) -> Interruption:
        # an ignored SIGINT stays ignored (a background job of a shell without job control, as Python leaves it)
        if not self.trainer.world.distributed and threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        print(f"\nfdivctl: interrupted: finishing this {self.unit}, then saving a checkpoint (Ctrl-C again quits "
              "without one)", file=sys.stderr, flush=True)

    def save_if_asked(self, done: int, extra: dict | None = None) -> None:
        """After ``done`` steps (iterations): when Ctrl-C was pressed, checkpoint with ``extra`` (unless the loop
        has just saved this one) and exit 130."""
        if not self.asked:
            return
        if not self.trainer.saved:
            self.trainer.save(extra)
        print(f"fdivctl: stopped after {self.unit} {done}: checkpoint in {self.trainer.out}; run the same command "
              "with --resume to continue", file=sys.stderr, flush=True)
        sys.exit(130)


class JsonlLog:
    """Appends one JSON object per line to ``path``, its directory made if need be (or does nothing without a
    path).

    A regular file holds the records of one run's steps 1 … ``step``, where the run starts at ``step`` (0, or
    the checkpoint a resumed run continues): a new run replaces a previous file, and a resumed one keeps what came
    before its checkpoint but not the steps it is about to redo (those a crash after the checkpoint logged).  A
    stream (``/dev/stdout``, a pipe, any symlink) is only appended to."""

    def __init__(self, path: Path | None, step: int = 0):
        self.file = None
        if path:
            path = Path(path)
            if not path.is_symlink() and (path.is_file() or not path.exists()):
                kept = _records_through(path, step) if step else []
                with atomic_path(path) as tmp:
                    tmp.write_text("".join(kept))
            self.file = open(path, "a")

    def write(self, record: dict) -> None:
        if self.file:
            with storage_failures_named(self.file.name):
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()

    def __enter__(self) -> JsonlLog:
        return self

    def __exit__(self, *exc) -> None:
        if self.file:
            with storage_failures_named(self.file.name):
                self.file.close()


class MetricsLog:
    """Where a run's per-step records go: the ``--log-jsonl`` file (:class:`JsonlLog`) and, with ``--tensorboard
    DIR``, a TensorBoard event file in ``DIR``: each numeric field as a scalar at the record's ``step`` (lists, such
    as ``pass_histogram``, stay in the JSONL only).  A resumed run purges the TensorBoard steps after its checkpoint
    (``SummaryWriter(purge_step=)``), as the JSONL drops them.  Only the main process writes."""

    def __init__(self, loop: LoopOptions, main: bool, step: int = 0):
        self.jsonl = JsonlLog(loop.log_jsonl if main else None, step)
        self.board = None
        if main and loop.tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter  # checked importable by run_settings.begin_run

            with storage_failures_named(loop.tensorboard):
                # the run's next record is step + 1: what an earlier run logged from there on is dropped
                self.board = SummaryWriter(str(loop.tensorboard), purge_step=step + 1 if step else None)

    def write(self, record: dict) -> None:
        self.jsonl.write(record)
        if self.board is not None:
            with storage_failures_named(self.board.log_dir):
                for key, value in record.items():
                    if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                        self.board.add_scalar(key, value, global_step=record["step"])
                self.board.flush()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.jsonl.__exit__(*exc)
        if self.board is not None:
            with storage_failures_named(self.board.log_dir):
                self.board.close()


def _records_through(path: Path, step: int) -> list[str]:
    """The lines of the JSONL log ``path`` whose record's ``step`` is at most ``step`` (a line a crash cut off
    is dropped)."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    return kept


#: optimizer steps whose examples are sorted by length together (HF's LengthGroupedSampler sorts 50 batches)
LENGTH_GROUP_STEPS = 50


def batches_for_step(n_examples: int, step: int, opts: LoopOptions,
                     lengths: Sequence[int] | None = None) -> list[list[int]]:
    """The ``grad_accum`` micro-batches (example indices) of optimizer step ``step``; with ``opts.group_by_length``
    the epoch's shuffled examples are grouped by their ``lengths`` (:func:`_grouped_by_length`)."""
    per_step = opts.batch_size * opts.grad_accum
    per_epoch = max(1, n_examples // per_step)
    epoch, offset = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(opts.seed + epoch)
    order = torch.randperm(n_examples, generator=generator).tolist()
    if opts.group_by_length:
        order = _grouped_by_length(order, lengths, per_step, generator)
    chunk = order[offset * per_step : (offset + 1) * per_step]
    return [chunk[i : i + opts.batch_size] for i in range(0, len(chunk), opts.batch_size)]


def _grouped_by_length(order: list[int], lengths: Sequence[int], per_step: int,
                       generator: torch.Generator) -> list[int]:
    """``order`` cut into groups of :data:`LENGTH_GROUP_STEPS` steps' examples, each group sorted by length and its
    steps shuffled again: a step, and so each micro-batch, holds sequences of similar length, padded to little
    more than their own (HF's ``group_by_length``), while which steps come first stays random, with no trend from
    long to short."""
    group = per_step * LENGTH_GROUP_STEPS
    grouped = []
    for start in range(0, len(order), group):
        ranked = sorted(order[start : start + group], key=lambda i: lengths[i])
        steps = [ranked[i : i + per_step] for i in range(0, len(ranked), per_step)]
        grouped += [i for s in torch.randperm(len(steps), generator=generator).tolist() for i in steps[s]]
    return grouped


def total_steps(n_examples: int, opts: LoopOptions) -> int:
    per_epoch = max(1, n_examples // (opts.batch_size * opts.grad_accum))
    return opts.max_steps if opts.max_steps is not None else per_epoch * opts.epochs


def _averaged(loss_fn, rows: list[int], step: int, total: int, count: int) -> MicroBatch:
    """A micro-batch whose loss and figures are divided by ``count`` (its token count is kept)."""

    def micro() -> tuple[torch.Tensor, dict]:
        loss, figures = loss_fn(rows, step, total)
        return loss / count, {k: v if k == "tokens" else v / count for k, v in figures.items()}

    return micro


@dataclass(frozen=True)
class TokenMean:
    """A loss function whose loss is a mean over its micro-batch's ``tokens`` figure: :func:`run_loop` then weighs
    each step's micro-batches by their tokens (:class:`StepTokenMean`).  ``per_micro_batch`` names the figures that
    are means over a micro-batch's rows or the micro-batch itself (a response length, a share of micro-batches):
    those are averaged over the micro-batches with equal weights."""

    per_micro_batch: tuple[str, ...] = ()


class StepTokenMean:
    """One optimizer step whose loss is the mean over all its tokens, on every rank, as one micro-batch holding them
    would give — not the mean of the micro-batches' means, which weighs a token of a short micro-batch (or of a
    rank holding few tokens) more than one of a long one.  The same correction as the "gradient accumulation fix"
    of Hugging Face transformers (v4.46, 2024), which normalizes by the tokens of the whole accumulated batch.

    Micro-batch i's loss ``ℓ_i``, the mean over this rank's ``n_i`` tokens, is multiplied by ``R·n_i / M_1``
    before its backward, with ``M_i`` its tokens over all R ranks (one all-reduce): ``M_1`` is uniform across the
    ranks and keeps the gradient at the size of a mean (no fp16 overflow).  After the last micro-batch the
    gradients and the token-mean figures are multiplied by ``M_1 / Σ_i M_i``; the ranks' averaging then leaves
    ``Σ_{i,r} n_{i,r} ℓ_{i,r} / Σ_i M_i``.  ``tokens`` is summed; the ``per_micro_batch`` figures are divided by
    the number of micro-batches.
    """

    def __init__(self, spec: TokenMean, micro_batches: int, world):
        self.spec, self.count, self.world = spec, micro_batches, world
        self.first = self.total = 0.0

    def micro(self, loss_fn, rows: list[int], step: int, total: int) -> MicroBatch:
        def run() -> tuple[torch.Tensor, dict]:
            loss, figures = loss_fn(rows, step, total)
            tokens = float(figures.get("tokens", 0.0))
            everywhere = distributed.sum_over_ranks(tokens, self.world)
            self.first = self.first or max(everywhere, 1.0)
            self.total += everywhere
            weight = self.world.size * tokens / self.first
            return loss * weight, {k: v if k == "tokens" else v / self.count if k in self.spec.per_micro_batch
                                   else v * weight for k, v in figures.items()}

        return run

    def rescale(self, figures: dict[str, float]) -> float:
        """Trainer.update's ``rescale``: the token-mean figures to the step's mean; the gradients' factor."""
        factor = self.first / max(self.total, 1.0)
        for key in figures:
            if key != "tokens" and key not in self.spec.per_micro_batch:
                figures[key] *= factor
        return factor


def run_loop(
    model,
    tokenizer,
    n_examples: int,
    loss_fn: Callable[[list[int], int, int], tuple[torch.Tensor, dict]],
    out: Path,
    opts: LoopOptions,
    on_step: Callable[[int, int, dict], None] | None = None,
    evaluate: Callable[[int, int], dict] | None = None,
    lengths: Sequence[int] | None = None,
    token_mean: TokenMean | None = None,
) -> dict:
    """Optimize ``loss_fn(example indices, step, total steps) → (loss, figures)``; checkpoint into ``out``.

    ``lengths`` (tokens per example) group each step's examples by length with ``opts.group_by_length``.

    Each step's loss is the mean of its micro-batches' losses (a mean over examples: the micro-batches hold as
    many), or with ``token_mean`` the mean over all the step's tokens (:class:`StepTokenMean`).

    Under torchrun each rank gets its share of every micro-batch (:mod:`fdivctl.training.distributed`).

    With ``evaluate`` and ``opts.eval_every``, ``evaluate(step, total)`` runs every
    ``eval_every`` steps and after the last; its figures join that step's record.
    """
    if opts.group_by_length and lengths is None:
        raise UserError("--group-by-length groups fixed sequences by their lengths, and this run has none")
    total = total_steps(n_examples, opts)
    trainer = Trainer(model, tokenizer, out, opts, total)
    world = trainer.world
    if opts.batch_size % world.size:
        raise UserError(f"--batch-size {opts.batch_size} must be a multiple of the {world.size} processes "
                        "(each micro-batch is split over them)")
    last: dict = {}
    with MetricsLog(opts, world.main, trainer.step) as log, Interruption(trainer) as interruption:
        while trainer.step < total:
            micro = [rows[world.rank :: world.size] for rows in batches_for_step(n_examples, trainer.step, opts,
                                                                                  lengths)]
            if token_mean is None:
                figures = trainer.update(_averaged(loss_fn, rows, trainer.step, total, len(micro)) for rows in micro)
            else:
                weighing = StepTokenMean(token_mean, len(micro), world)
                figures = trainer.update((weighing.micro(loss_fn, rows, trainer.step, total) for rows in micro),
                                         weighing.rescale)
            trainer.advance_schedule()
            last = {"step": trainer.step, **figures}
            if evaluate and opts.eval_every and (trainer.step % opts.eval_every == 0 or trainer.step == total):
                last.update(evaluate(trainer.step, total))
            log.write(last)
            if opts.save_every and trainer.step % opts.save_every == 0 and trainer.step < total:
                trainer.save()
            if on_step:
                on_step(trainer.step, total, last)
            if trainer.step < total:
                interruption.save_if_asked(trainer.step)
    trainer.save()
    return {"steps": trainer.step, **last}
