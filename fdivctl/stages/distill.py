"""``distill``: pull a student toward a teacher on fixed sequences, offline or online.

Teacher signal: ``logits`` (a store from ``teacher-logits``: top-k + tail,
read memory-mapped and checked token by token against the batch) or
``teacher`` (a model run under no_grad; its logits are made chunk by chunk
inside the engine).  The student's final hidden states at the positions that
predict the completion tokens go through :func:`fdivctl.objectives.kd.kd_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fdivctl import engine
from fdivctl.errors import UserError
from fdivctl.io.checkpoints import load_causal_lm, load_tokenizer
from fdivctl.io.hashing import tokenizer_hash
from fdivctl.io.logit_store import LogitStore
from fdivctl.io.sequences import load_sequences
from fdivctl.objectives.kd import KDBatch, kd_loss, parse_loss
from fdivctl.objectives.pld import PlackettLuce
from fdivctl.schedules.divergence_schedule import DivergenceSchedule
from fdivctl.stages.signals import (
    FrozenModel,
    check_same_tokenizer,
    scored_hidden,
    store_target,
    store_token_logprobs,
)
from fdivctl.training.checkpoint import has_state
from fdivctl.training.loop import LoopOptions, run_loop


@dataclass
class DistillOptions:
    loss: str = "fkl"  # a registry spec ("jsd:beta=0.3") or "ce"
    schedule: str | None = None  # "fkl:0.5,rkl:0.5": replaces loss
    temperature: float = 1.0
    mix_ce: float = 0.0
    tail: str = "tail"
    vocab: str = "strict"
    dtype: str = "auto"
    device: str = "auto"
    allow_tokenizer_mismatch: bool = False
    teacher_weights: str | None = None  # several teachers: "0.7,0.3" or "confidence" (default)
    loop: LoopOptions = field(default_factory=LoopOptions)

    def divergences(self) -> DivergenceSchedule | None:
        """The divergence of each step (a one-stage schedule for a fixed --loss); None for ce."""
        try:
            if self.schedule:
                return DivergenceSchedule.parse(self.schedule, parse_loss)
            if self.loss == "ce":
                return None
            return DivergenceSchedule([(parse_loss(self.loss), 1.0)])
        except ValueError as err:
            raise UserError(f"--{'schedule' if self.schedule else 'loss'}: {err}") from None


def _teacher_weights(spec: str | None, n_teachers: int) -> list[float] | str:
    if spec is not None and n_teachers < 2:
        raise UserError("--teacher-weights needs several --teacher")
    if spec is None or spec == "confidence":
        return "confidence"
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise UserError(f"--teacher-weights {spec!r}: expected numbers like 0.7,0.3 or 'confidence'") from None
    if len(weights) != n_teachers or any(w < 0 for w in weights) or not sum(weights) > 0:
        raise UserError(f"--teacher-weights {spec!r}: need {n_teachers} non-negative weights with a positive sum")
    return weights


def prepare_distill(
    student: Path,
    data: Path,
    opts: DistillOptions,
    logits: Path | None = None,
    teacher: Path | list[Path] | None = None,
    resume_from: Path | None = None,
):
    """(model, tokenizer, number of examples, loss_fn(example indices, step, total) → (loss, figures))."""
    schedule = opts.divergences()
    teachers = [] if teacher is None else [teacher] if isinstance(teacher, (str, Path)) else list(teacher)
    teacher = teachers or None
    if schedule is not None and (logits is None) == (teacher is None):
        raise UserError("give exactly one teacher signal: --logits DIR (offline) or --teacher MODEL (online)")
    if schedule is None and (logits is not None or teacher is not None):
        raise UserError("--loss ce uses no teacher: drop --logits/--teacher")
    if not opts.temperature > 0:
        raise UserError(f"--temperature must be > 0, got {opts.temperature}")
    tokenizer = load_tokenizer(student, "student")
    student_hash = tokenizer_hash(tokenizer)
    seqs = load_sequences(data, tokenizer)
    for row in range(len(seqs)):  # refuse unscorable rows before any training, not when their batch comes
        seqs.first_scored(row, include_prompt=False)
    if seqs.tokenizer_hash and seqs.tokenizer_hash != student_hash and not opts.allow_tokenizer_mismatch:
        raise UserError(f"tokenizer mismatch: {data} was tokenized with {seqs.tokenizer_hash[:16]}…, the student "
                        f"has {student_hash[:16]}… (--allow-tokenizer-mismatch skips this check and is unsafe)")
    store = None
    if logits is not None:
        store = LogitStore(logits)
        store.check_tokenizer(student_hash, "student", opts.allow_tokenizer_mismatch)
    weights = _teacher_weights(opts.teacher_weights, len(teachers))
    for t in teachers:
        check_same_tokenizer(t, "teacher", student_hash, f"student {student}", opts.allow_tokenizer_mismatch)
    frozen = [FrozenModel.load(t, "teacher", opts.dtype, opts.device) for t in teachers]
    model = load_causal_lm(resume_from or student, opts.dtype, opts.device, "student").train()
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    device = head.weight.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def loss_fn(rows: list[int], step: int = 0, total: int = 1):
        divergence = None if schedule is None else schedule.at(step, total)
        batch = {k: v.to(device) for k, v in seqs.batch(rows, pad_id).items()}
        hidden = scored_hidden(decoder, batch)
        if not torch.isfinite(hidden).all():  # diverged weights: the loop stops on the non-finite loss
            return hidden.new_tensor(float("nan")), {}
        target, token_logprob = None, None
        if store is not None:
            target = store_target(store, seqs, rows, opts.tail, device)
            if isinstance(divergence, PlackettLuce):
                token_logprob = store_token_logprobs(store, seqs, rows, device)
        elif frozen:
            heads = [t.target(t.hidden(batch), opts.vocab) for t in frozen]
            target = heads[0] if len(heads) == 1 else engine.TeacherMixture(heads, weights)
        try:
            return kd_loss(KDBatch(hidden, batch["token"], target, token_logprob), head.weight, getattr(head, "bias", None),
                           divergence, opts.temperature, opts.mix_ce)
        except ValueError as err:
            raise UserError(str(err)) from None

    return model, tokenizer, len(seqs), loss_fn


def run_distill(
    student: Path,
    out: Path,
    data: Path,
    opts: DistillOptions,
    logits: Path | None = None,
    teacher: Path | list[Path] | None = None,
    on_step: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Distill into ``out``; with ``opts.loop.resume`` continue the checkpoint there."""
    resume_from = out if opts.loop.resume and has_state(out) else None
    model, tokenizer, n, loss_fn = prepare_distill(student, data, opts, logits, teacher, resume_from)
    return run_loop(model, tokenizer, n, loss_fn, out, opts.loop, on_step)
