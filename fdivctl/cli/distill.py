"""``fdivctl distill``: offline (logit store) or online (teacher model) distillation."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fdivctl.cli.progress import progress_bar
from fdivctl.stages.distill import DistillOptions, run_distill
from fdivctl.training.loop import LoopOptions


def command(
    student: Path = typer.Argument(..., help="Student model directory (save_pretrained format)."),
    out: Path = typer.Argument(..., help="Checkpoint directory to write (HF format + fdivctl_state/)."),
    data: Path = typer.Option(..., help="Sequences Parquet (rollouts or prompt/completion text) to distill on."),
    logits: Path = typer.Option(None, help="Offline teacher signal: a store from `fdivctl teacher-logits`."),
    teacher: list[Path] = typer.Option(None, "--teacher", help="Online teacher signal: a teacher model directory "
                                       "(run under no_grad); repeat for a per-token mixture of teachers."),
    teacher_weights: str = typer.Option(None, help="Several teachers: fixed weights (0.7,0.3) or confidence "
                                        "(per token, each teacher's top-token probability; MAD-OPD). Default "
                                        "confidence."),
    loss: str = typer.Option("fkl", help="A registry divergence (fkl, rkl, jsd, tv, hellinger, alpha, skl, srkl; "
                             "params as jsd:beta=0.3) or ce (plain SFT)."),
    beta: float = typer.Option(None, help="Shorthand for --loss jsd:beta=BETA."),
    schedule: str = typer.Option(None, help="Divergences by share of steps, e.g. fkl:0.5,rkl:0.5 (PACED's two "
                                 "stages); replaces --loss; shares must sum to 1."),
    temperature: float = typer.Option(1.0, help="Distillation temperature (student and teacher divided by it)."),
    mix_ce: float = typer.Option(0.0, help="Weight of the ground-truth cross-entropy added to the divergence."),
    tail: str = typer.Option("tail", help="Top-k store form: tail (k+1 buckets), renormalize, or ignore."),
    vocab: str = typer.Option("strict", help="Online teacher with another vocabulary size: strict, truncate, pad."),
    lr: float = typer.Option(1e-4, help="Peak learning rate (AdamW)."),
    lr_schedule: str = typer.Option("cosine", help="constant, linear or cosine decay after warm-up."),
    warmup: int = typer.Option(0, help="Linear warm-up steps."),
    batch_size: int = typer.Option(8, help="Sequences per micro-batch."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    max_steps: int = typer.Option(None, help="Optimizer steps (default: --epochs over the data)."),
    epochs: int = typer.Option(1, help="Passes over the data when --max-steps is not given."),
    seed: int = typer.Option(0, help="Seed of the data order."),
    max_grad_norm: float = typer.Option(1.0, help="Gradient clipping norm."),
    save_every: int = typer.Option(0, help="Checkpoint every N steps (0: only at the end)."),
    log_jsonl: Path = typer.Option(None, help="Append one JSON line per step: loss, divergence, ce, grad norm, lr, "
                                   "tokens/s."),
    resume: bool = typer.Option(False, help="Continue from the checkpoint in OUT (exact: data order, optimizer, RNG)."),
    dtype: str = typer.Option("auto", help="Model dtype: auto, fp32, bf16, fp16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    allow_tokenizer_mismatch: bool = typer.Option(False, help="UNSAFE: skip the student/teacher tokenizer check."),
) -> None:
    """Distill a teacher into a student with any divergence, through the chunked loss engine."""
    if beta is not None:
        loss = f"jsd:beta={beta}"
    loop = LoopOptions(lr=lr, lr_schedule=lr_schedule, warmup=warmup, batch_size=batch_size, grad_accum=grad_accum,
                       max_steps=max_steps, epochs=epochs, seed=seed, max_grad_norm=max_grad_norm,
                       save_every=save_every, log_jsonl=log_jsonl, resume=resume)
    opts = DistillOptions(loss=loss, schedule=schedule, temperature=temperature, mix_ce=mix_ce, tail=tail, vocab=vocab, dtype=dtype,
                          device=device, allow_tokenizer_mismatch=allow_tokenizer_mismatch,
                          teacher_weights=teacher_weights, loop=loop)
    with progress_bar("distill", "steps") as progress:
        task = progress.add_task("distill", total=None)

        def on_step(step, total, figures):
            progress.update(task, completed=step, total=total,
                            description=f"distill loss {figures.get('loss', float('nan')):.4f}")

        summary = run_distill(student, out, data, opts, logits=logits, teacher=teacher or None, on_step=on_step)
    typer.echo(json.dumps({"checkpoint": str(out), **summary}))


def register(app: typer.Typer) -> None:
    app.command("distill")(command)
