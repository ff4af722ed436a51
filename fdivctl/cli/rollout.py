"""``fdivctl rollout`` (sample completions) and ``fdivctl merge`` (join its shards)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fdivctl.cli.options import parse_shard
from fdivctl.cli.progress import progress_bar
from fdivctl.generation.sampling import SamplingOptions
from fdivctl.stages.rollout import RolloutOptions, merge_rollouts, run_rollout, shard_path
from fdivctl.training.distributed import launched


def rollout(
    model: Path = typer.Argument(..., help="Policy model directory (save_pretrained format)."),
    prompts: Path = typer.Argument(..., help="Prompts Parquet: prompt_id, prompt (text or messages) or messages, any "
                                   "extra columns (carried through, e.g. answer)."),
    out: Path = typer.Argument(..., help="Rollouts Parquet to write (one row per sample)."),
    n: int = typer.Option(1, "--n", "--samples", help="Samples per prompt (--samples under torchrun, whose own "
                          "options swallow --n)."),
    temperature: float = typer.Option(1.0, help="Sampling temperature; 0 = greedy."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    top_k: int = typer.Option(0, help="Top-k sampling; 0 = off."),
    max_new_tokens: int = typer.Option(256, help="Longest completion, in tokens."),
    seed: int = typer.Option(0, help="Random seed; batch b samples with seed + b."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    backend: str = typer.Option(
        "auto", help="hf (transformers generate), vllm, or auto (vllm when installed and on CUDA, else hf)."
    ),
    tensor_parallel_size: int = typer.Option(1, help="vLLM tensor-parallel GPUs per engine."),
    batch_size: int = typer.Option(16, help="Prompts per generate call."),
    dtype: str = typer.Option("auto", help="Model dtype: auto, fp32, bf16, fp16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    chat: bool = typer.Option(False, help="Wrap plain prompts in the tokenizer's chat template."),
    shard: str = typer.Option(None, help="Take every n-th prompt starting at the i-th, as i/n (default 0/1; under "
                              "torchrun RANK/WORLD_SIZE, each rank writing OUT with -shard-i-of-n before its "
                              "suffix: join them with fdivctl merge)."),
    resume: bool = typer.Option(False, help="Continue an interrupted run from OUT.parts/."),
) -> None:
    """Sample completions with their token ids and per-token log-probs."""
    if shard is None and launched():
        out = shard_path(out, *parse_shard(None))
    opts = RolloutOptions(
        sampling=SamplingOptions(n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                                 max_new_tokens=max_new_tokens, seed=seed, stop=list(stop or [])),
        backend=backend, batch_size=batch_size, dtype=dtype, device=device, chat=chat,
        shard=parse_shard(shard), resume=resume, tensor_parallel_size=tensor_parallel_size,
    )
    with progress_bar("rollout", "samples") as progress:
        task = progress.add_task("rollout", total=None)
        tokens = progress.add_task("tokens", total=None)
        summary = run_rollout(
            model, prompts, out, opts,
            on_batch=lambda s, t: (progress.advance(task, s), progress.advance(tokens, t)),
        )
    typer.echo(json.dumps({"rollouts": str(out), **summary}))


def merge(
    out: Path = typer.Argument(..., help="Merged Parquet to write."),
    inputs: list[Path] = typer.Argument(..., help="Shard outputs of one rollout (or score) run."),
    partial: bool = typer.Option(False, help="Merge the shards given even if some of the run's are missing (they "
                                 "are named in a warning and in the output's provenance, missing_shards)."),
) -> None:
    """Join the shard outputs of one run (--shard i/n) into one file: every shard, each once."""
    rows, missing = merge_rollouts(inputs, out, partial)
    if missing:
        typer.echo(f"fdivctl: warning: merged without shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                   "of the run", err=True)
    typer.echo(json.dumps({"merged": str(out), "rows": rows, **({"missing_shards": missing} if missing else {})}))


def register(app: typer.Typer) -> None:
    app.command("rollout")(rollout)
    app.command("merge")(merge)
