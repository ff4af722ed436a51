"""``fdivctl demo``: the built-in quickstart task and pipeline (no download of any model or data)."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import typer

from fdivctl.demo import pipeline

app = typer.Typer(help="The built-in quickstart: data, a tiny model, the pipeline, its report.",
                  no_args_is_help=True)


@app.command("data")
def data(
    out: Path = typer.Argument(..., help="Directory for prompts.parquet, eval_prompts.parquet, sft.parquet, "
                               "tokenizer/."),
    sft_per_prompt: int = typer.Option(48, help="SFT demonstrations per training prompt (uniform over its answers)."),
    seed: int = typer.Option(0, help="Seed of the demonstrations."),
) -> None:
    """Write the digitsum task: training prompts, eval prompts (in/out of domain), SFT data, a tokenizer."""
    typer.echo(json.dumps({"data": str(out), **pipeline.write_data(out, sft_per_prompt, seed)}))


@app.command("init")
def init(
    tokenizer: Path = typer.Argument(..., help="Tokenizer directory (from `fdivctl demo data`)."),
    out: Path = typer.Argument(..., help="Model directory to write (save_pretrained)."),
    hidden: int = typer.Option(128, help="Hidden size (a multiple of 64)."),
    layers: int = typer.Option(2, help="Transformer layers."),
    seed: int = typer.Option(0, help="Seed of the random initialisation."),
) -> None:
    """Write a random-init Qwen2 causal LM with the given tokenizer."""
    from transformers import AutoTokenizer

    from fdivctl.errors import UserError

    if hidden < 64 or hidden % 64 or layers < 1:
        raise UserError(f"--hidden must be a positive multiple of 64 (heads of 64) and --layers ≥ 1; got "
                        f"--hidden {hidden} --layers {layers}")

    from fdivctl import tiny

    tiny.make_model(out, AutoTokenizer.from_pretrained(tokenizer), seed=seed, hidden=hidden, layers=layers,
                    max_positions=128)
    typer.echo(json.dumps({"model": str(out), "hidden": hidden, "layers": layers}))


@app.command("report")
def report(out: Path = typer.Argument(..., help="The quickstart output directory (holding metrics.json).")) -> None:
    """Write REPORT.md with the measured table from metrics.json, and print it."""
    path = pipeline.write_report(out)
    typer.echo(path.read_text())


@app.command("script")
def script(quick: bool = typer.Option(False, help="The CI-sized budgets.")) -> None:
    """Print the quickstart as a shell script (examples/quickstart.sh)."""
    typer.echo(pipeline.script(quick), nl=False)


@app.command("run")
def run(
    out: Path = typer.Argument(Path("quickstart-out"), help="Output directory (must not exist)."),
    quick: bool = typer.Option(False, help="CI-sized budgets: checks every stage in a few minutes; too small for "
                               "the science."),
) -> None:
    """Run the whole quickstart, printing each fdivctl command before it runs."""
    from fdivctl.cli import app as root
    from fdivctl.errors import UserError
    from fdivctl.io.atomic import check_output_dir

    if out.exists():
        raise UserError(f"{out} exists: choose a new directory")
    check_output_dir(out)
    started = time.perf_counter()
    for what, args in pipeline.steps(str(out), quick):
        typer.secho(f"\n# {what}\n$ fdivctl {shlex.join(args)}", fg=typer.colors.CYAN, err=True)
        code = root(args=args, standalone_mode=False)
        if isinstance(code, int) and code:
            raise typer.Exit(code)
    typer.echo(f"quickstart finished in {time.perf_counter() - started:.0f} s: {out}/REPORT.md", err=True)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="demo")
