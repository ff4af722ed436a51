"""``fdivctl eval``: metrics.json, per_prompt.parquet, plots, and a table on the terminal."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fdivctl.errors import UserError
from fdivctl.generation.sampling import SamplingOptions
from fdivctl.rewards.verifiers import make_reward
from fdivctl.stages.evaluate import EvalOptions, run_eval
from fdivctl.stages.rollout import RolloutOptions, run_rollout
from fdivctl.stages.score import check_prompt_columns, score_table

TABLE_FIGURES = ("mean_reward", "greedy_pass@1", "distinct_correct", "distinct_4", "mean_length", "ece", "kl")


def _parse_runs(specs: list[str]) -> dict[str, Path]:
    runs: dict[str, Path] = {}
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq or not name or not path:
            raise UserError(f"--run {spec!r}: expected NAME=FILE")
        if name in runs:
            raise UserError(f"--run {name!r} given twice")
        runs[name] = Path(path)
    return runs


def _parse_models(specs: list[str], runs: dict[str, Path]) -> dict[str, Path]:
    """``--model DIR`` (a run named after the directory) or ``--model NAME=DIR``, each name new to the runs."""
    models: dict[str, Path] = {}
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq or Path(spec).exists():
            directory = Path(spec)
            name, given = directory.resolve().name or "model", "its directory's name"
        elif name and path:
            directory, given = Path(path), "given"
        else:
            raise UserError(f"--model {spec!r}: expected DIR or NAME=DIR")
        if name in runs or name in models:
            raise UserError(f"--model {spec}: its run would be named {name!r} ({given}), which "
                            f"{'a --run' if name in runs else 'another --model'} already uses: name one NAME=DIR")
        models[name] = directory
    return models


def _parse_ks(spec: str) -> list[int] | None:
    if spec.strip() == "auto":
        return None
    try:
        return [int(k) for k in spec.split(",") if k.strip()]
    except ValueError:
        raise UserError(f"--k {spec!r}: expected comma-separated integers, e.g. 1,2,4,8, or auto") from None


def metrics_table(report: dict) -> Table:
    """The terminal table: the same numbers as metrics.json, 4 decimals."""
    ks = report["k"]
    table = Table(title="fdivctl eval")
    columns = ["run", "group", "prompts", *[f"pass@{k}" for k in ks], f"maj@{ks[-1]}"]
    sample = next(iter(report["runs"].values()))["all"]
    columns += [f for f in TABLE_FIGURES if f in sample]
    if report["base"]:
        columns += [f"forgetting@{ks[-1]}", f"newly_solved@{ks[-1]}"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("run", "group") else "right")
    for run, figures in report["runs"].items():
        groups = [("all", figures["all"]), *figures.get("domains", {}).items()]
        for group, values in groups:
            cells = [run, group]
            for column in columns[2:]:
                value = values.get(column)
                cells.append("–" if value is None else (str(value) if column == "prompts" else f"{value:.4f}"))
            table.add_row(*cells)
    return table


def command(
    out: Path = typer.Argument(..., help="Output directory: metrics.json, per_prompt.parquet, PNG plots."),
    run: list[str] = typer.Option(None, "--run", help="A scored Parquet to evaluate, as NAME=FILE (repeatable)."),
    base: str = typer.Option(None, help="Run to compare against: forgetting and newly solved prompts, scatter plots."),
    k: str = typer.Option("auto", "--k", help="Values of k for pass@k and maj@k, comma-separated (each ≤ samples "
                          "per prompt); auto: 1, 2, 4, … up to the fewest samples any prompt of any run has."),
    bootstrap: int = typer.Option(0, help="Bootstrap resamples over prompts for 95 % intervals of pass@k (0 = off)."),
    domain_column: str = typer.Option(None, help="Column that splits every figure by domain (e.g. in/out of domain)."),
    answers: str = typer.Option("math", help="How answers are normalized for maj@k and distinct answers: math or text."),
    seed: int = typer.Option(0, help="Seed of the bootstrap."),
    model: list[str] = typer.Option(None, "--model", help="Shortcut: sample this model directory on --prompts, "
                                    "score, then evaluate it, as a run named after the directory, or NAME=DIR "
                                    "(repeatable: every model on the same prompts, seed and settings; an interrupted "
                                    "run continues its sampling when run again)."),
    prompts: Path = typer.Option(None, help="Prompts Parquet for --model."),
    verifier: list[str] = typer.Option(None, "--verifier", help="Verifier for --model, as in `fdivctl score` "
                                       "(default math; repeatable, the first deciding correct)."),
    reward_weights: str = typer.Option(None, help="--model: weights of the repeated --verifier rewards."),
    answer_column: str = typer.Option(None, help="--model: column of the gold answer that math, math-verify, exact, "
                                      "sql and a regex without --pattern read (default: answer; e.g. solution)."),
    n: int = typer.Option(8, "--n", help="Samples per prompt for --model."),
    temperature: float = typer.Option(1.0, help="Sampling temperature for --model."),
    max_new_tokens: int = typer.Option(256, help="Longest completion for --model."),
    sampling_seed: int = typer.Option(0, help="Seed of --model's sampling (the same for every model)."),
    kl_model: Path = typer.Option(None, help="Measure each run's KL(run ‖ this model) in nats per sequence from the "
                                  "run's own samples (their recorded log-probs against this model's, at the "
                                  "sampling temperature; rollouts from `fdivctl rollout` without top-p/top-k): "
                                  "usually the policy the --base run sampled. Adds kl, kl_stderr and "
                                  "reward_kl.png, with --base's best-of-N frontier."),
    device: str = typer.Option("auto", help="Device for --model and --kl-model."),
    chat: bool = typer.Option(False, help="--model: wrap plain prompts in the tokenizer's chat template, as rollout "
                              "--chat does (messages prompts always are)."),
) -> None:
    """Evaluate scored runs: pass@k (unbiased), maj@k, diversity, calibration, forgetting, with plots."""
    runs = _parse_runs(run or [])
    opts = EvalOptions(ks=_parse_ks(k), base=base, bootstrap=bootstrap, domain_column=domain_column,
                       answers=answers, seed=seed, kl_model=kl_model, device=device)
    models = _parse_models(model or [], runs)
    opts.check([*runs, *models])  # before --model samples
    if models:
        if prompts is None:
            raise UserError("--model needs --prompts")
        spec = make_reward(verifier, reward_weights, answer_column=answer_column)
        check_prompt_columns(prompts, spec)
        out.mkdir(parents=True, exist_ok=True)
        sampling = SamplingOptions(n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=sampling_seed)
        for name, directory in models.items():
            rollouts, scored = out / f"{name}.rollouts.parquet", out / f"{name}.scored.parquet"
            run_rollout(directory, prompts, rollouts, RolloutOptions(sampling=sampling, device=device, chat=chat,
                                                                     resume=True))
            score_table(rollouts, scored, spec)
            runs[name] = scored
    report = run_eval(runs, out, opts)
    for name, figures in report["runs"].items():
        if figures["all"].get("shared_prompts") == 0:
            typer.echo(f"fdivctl: warning: run {name} shares no prompt_id with --base {base}: forgetting and newly "
                       "solved are undefined (–)", err=True)
    Console(width=200).print(metrics_table(report))
    typer.echo(f"wrote {out / 'metrics.json'}")


def register(app: typer.Typer) -> None:
    app.command("eval")(command)
