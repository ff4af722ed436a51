"""``fdivctl teacher-logits``: cache a teacher's top-k distributions; ``--verify`` a store."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fdivctl.cli.options import parse_shard
from fdivctl.cli.progress import progress_bar
from fdivctl.errors import UserError
from fdivctl.io.logit_store import verify_store
from fdivctl.stages.teacher_logits import TeacherLogitsOptions, run_teacher_logits


def command(
    teacher: Path = typer.Argument(None, help="Teacher model directory (save_pretrained format)."),
    sequences: Path = typer.Argument(
        None,
        help="Sequences Parquet: rollouts (prompt_token_ids, completion_token_ids), text (prompt, completion), plain "
        "text (text: every token scored) or conversations (messages: one sequence per assistant reply); keys "
        "prompt_id, sample_idx.",
    ),
    out: Path = typer.Argument(None, help="Store directory to create or resume."),
    k: int = typer.Option(64, "--k", help="Top-k ids and log-probs kept per token."),
    temperature: float = typer.Option(1.0, help="Temperature of the stored log-probs."),
    dtype: str = typer.Option("bf16", help="Storage dtype of the top-k log-probs: bf16, fp16 or fp32."),
    batch_size: int = typer.Option(8, help="Sequences per teacher forward pass."),
    max_tokens_per_shard: int = typer.Option(
        None, help="Scored tokens per shard file at most (a row never splits; a full shard ends after a whole "
        "number of --batch-size batches). Default: about 64 MiB per file at this --k and --dtype (k=64 bf16: "
        "169,466 tokens), or the limit the store being resumed was made with. Each shard is written while the next "
        "is scored, and a resume redoes at most the unfinished shards."),
    shard: str = typer.Option(None, help="Process shards j with j mod n = i, as i/n, so n processes split one store "
                              "(default 0/1; under torchrun RANK/WORLD_SIZE)."),
    include_prompt: bool = typer.Option(False, help="Also score prompt tokens (after the first)."),
    chat: bool = typer.Option(False, help="Text (prompt, completion) tables: wrap each prompt in the tokenizer's "
                              "chat template, as rollout --chat does (distill --chat must then read the store)."),
    max_length: int = typer.Option(None, help="Cut each sequence to this many tokens, prompt + completion, keeping "
                                   "its start (TRL's max_length): the completion is cut, and a row whose prompt alone "
                                   "fills it is dropped; the summary counts both. Recorded: distill --max-length must "
                                   "agree. Default: refuse a sequence longer than the teacher's context."),
    device: str = typer.Option("auto", help="Where the teacher runs: auto, cpu, cuda, cuda:N."),
    model_dtype: str = typer.Option("auto", help="Teacher weights dtype: auto, fp32, bf16, fp16."),
    allow_tokenizer_mismatch: bool = typer.Option(
        False, help="UNSAFE: score token ids recorded with another tokenizer anyway."
    ),
    verify: Path = typer.Option(
        None, "--verify", help="Check an existing store (checksums, dtypes, shapes, row coverage) and exit."
    ),
) -> None:
    """Score sequences under a teacher once and cache its top-k distributions (a logit store).

    Resumable: rerun the same command after an interruption; finished shards are kept.
    """
    if verify is not None:
        problems = verify_store(verify)
        if problems:
            for problem in problems:
                typer.echo(f"fdivctl: {verify}: {problem}", err=True)
            raise typer.Exit(1)
        typer.echo(f"{verify}: ok")
        return
    if teacher is None or sequences is None or out is None:
        raise UserError("teacher-logits needs TEACHER SEQUENCES OUT (or --verify DIR)")
    opts = TeacherLogitsOptions(
        k=k, temperature=temperature, dtype=dtype, batch_size=batch_size,
        max_tokens_per_shard=max_tokens_per_shard, shard=parse_shard(shard),
        include_prompt=include_prompt, chat=chat, max_length=max_length, device=device, model_dtype=model_dtype,
        allow_tokenizer_mismatch=allow_tokenizer_mismatch,
    )
    with progress_bar("teacher-logits", "tok") as progress:
        task = progress.add_task("teacher-logits", total=None)
        summary = run_teacher_logits(
            teacher, sequences, out, opts,
            on_plan=lambda total: progress.update(task, total=total),
            on_tokens=lambda n: progress.advance(task, n),
        )
    typer.echo(json.dumps({"store": str(out), **summary}))


def register(app: typer.Typer) -> None:
    app.command("teacher-logits")(command)
