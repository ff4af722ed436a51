"""``eval``: pass@k, maj@k, best-of-N, diversity, calibration, forgetting and KL of scored runs, with plots.

Inputs are scored Parquet files (``prompt_id``, ``correct``; optional
``sample_idx``, ``reward``, ``completion``, ``completion_token_ids``,
``greedy`` (bool: that row is the greedy sample, reported as greedy pass@1 and
left out of pass@k), ``confidence`` (for ECE) and a domain column).  Answers
for maj@k and distinct-correct counts are normalized like the ``math``
verifier (``answers="math"``) or as stripped text (``"text"``).  With
``kl_model`` each run's KL to that model is estimated from its samples
(:mod:`fdivctl.stages.sample_kl`) and plotted against its mean reward beside
the base run's best-of-N frontier (:mod:`fdivctl.metrics.best_of_n`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from fdivctl.errors import UserError
from fdivctl.io.atomic import atomic_path, check_output_dir, write_json
from fdivctl.io.checkpoints import load_tokenizer, model_limits
from fdivctl.io.hashing import tokenizer_hash
from fdivctl.io.tables import read_table, require_columns, require_finite, require_no_nulls, write_table
from fdivctl.io.versions import library_versions
from fdivctl.metrics import plots
from fdivctl.metrics.best_of_n import best_of_n_kl_bound
from fdivctl.metrics.diversity import distinct_correct
from fdivctl.metrics.report import PromptSamples, aggregate, score_prompts, versus_base
from fdivctl.rewards.math_answer import extract_answer, normalize
from fdivctl.stages.sample_kl import kl_figures, sequence_log_ratios
from fdivctl.stages.signals import FrozenModel

ANSWER_MODES = ("math", "text")


@dataclass
class EvalOptions:
    ks: list[int] | None = None  # None: 1, 2, 4, … up to the fewest samples any prompt of any run has
    base: str | None = None
    bootstrap: int = 0
    domain_column: str | None = None
    answers: str = "math"
    seed: int = 0
    kl_model: Path | None = None  # each run's KL to this model, from its samples (stages/sample_kl.py)
    device: str = "auto"

    def check(self, run_names) -> None:
        """Refuse options that no data could make valid, for the runs ``run_names``."""
        if not run_names:
            raise UserError("give at least one --run NAME=FILE (or --model with --prompts)")
        if self.answers not in ANSWER_MODES:
            raise UserError(f"--answers {self.answers!r}; valid: {', '.join(ANSWER_MODES)}")
        if self.ks is not None and (not self.ks or min(self.ks) < 1):
            raise UserError("--k needs positive integers, e.g. 1,2,4,8")
        if self.bootstrap < 0:
            raise UserError(f"--bootstrap must be ≥ 0 (0 = no intervals), got {self.bootstrap}")
        if self.base is not None and self.base not in run_names:
            raise UserError(f"--base {self.base!r} is not one of the runs ({', '.join(run_names)})")


def _answer(completion: str | None, mode: str) -> str | None:
    if completion is None:
        return None
    if mode == "text":
        return completion.strip() or None
    found = extract_answer(completion)
    return normalize(found) if found is not None else None


def load_run(path: Path, opts: EvalOptions) -> list[PromptSamples]:
    """The prompts of one scored file, samples ordered by sample_idx (not yet scored)."""
    table = read_table(path)
    require_columns(table, path, ["prompt_id", "correct"], " (is it the output of `fdivctl score`?)")
    if opts.domain_column:
        require_columns(table, path, [opts.domain_column], " (from --domain-column)")
    if not pa.types.is_boolean(table.schema.field("correct").type):
        raise UserError(f"{path}: column 'correct' must be bool, got {table.schema.field('correct').type}")
    for name in ("prompt_id", "correct"):
        require_no_nulls(path, name, table.column(name))
    for name in ("reward", "confidence"):  # a NaN would be every figure it enters (and invalid JSON)
        if name in table.column_names:
            require_finite(path, name, table.column(name))
    rows = table.to_pylist()
    rows.sort(key=lambda r: (str(r["prompt_id"]), r.get("sample_idx") or 0))
    grouped: dict[str, PromptSamples] = {}
    for row in rows:
        pid = str(row["prompt_id"])
        if pid not in grouped:
            domain = str(row[opts.domain_column]) if opts.domain_column else "all"
            grouped[pid] = PromptSamples(pid, domain, [], [], [], [], [] if "confidence" in row else None)
        prompt = grouped[pid]
        if row.get("greedy"):
            prompt.greedy_correct = bool(row["correct"])
            continue
        prompt.correct.append(bool(row["correct"]))
        prompt.answers.append(_answer(row.get("completion"), opts.answers))
        prompt.rewards.append(float(row["reward"]) if row.get("reward") is not None else float(row["correct"]))
        tokens = row.get("completion_token_ids")
        prompt.tokens.append(tokens if tokens is not None else (row.get("completion") or "").split())
        if prompt.confidence is not None:
            prompt.confidence.append(float(row["confidence"]))
    prompts = [p for p in grouped.values() if p.n]
    if not prompts:
        raise UserError(f"{path}: no sampled (non-greedy) rows")
    return prompts


def powers_of_two_up_to(n: int) -> list[int]:
    """1, 2, 4, … ≤ n: the default k of pass@k and maj@k for runs with at least n samples per prompt."""
    return [1 << i for i in range(n.bit_length())]


def _check_ks(loaded: dict[str, list[PromptSamples]], runs: dict[str, Path], ks: list[int]) -> None:
    """pass@k needs k ≤ n for every prompt (the unbiased estimator of Chen et al. 2021 draws k of n)."""
    for name, prompts in loaded.items():
        fewest = min(prompts, key=lambda p: p.n)
        if max(ks) > fewest.n:
            raise UserError(
                f"run {name} ({runs[name]}): prompt {fewest.prompt_id!r} has n={fewest.n} samples, fewer than "
                f"k={max(ks)}; lower --k or sample more (--n) per prompt"
            )


def _by_domain(prompts: list[PromptSamples]) -> dict[str, list[PromptSamples]]:
    groups: dict[str, list[PromptSamples]] = defaultdict(list)
    for p in prompts:
        groups[p.domain].append(p)
    return dict(groups)


def run_eval(runs: dict[str, Path], out_dir: Path, opts: EvalOptions) -> dict:
    """Compute every figure, write metrics.json, per_prompt.parquet and the plots; return the metrics."""
    opts.check(list(runs))
    check_output_dir(out_dir)
    loaded = {name: load_run(path, opts) for name, path in runs.items()}
    if opts.ks is None:
        opts.ks = powers_of_two_up_to(min(p.n for prompts in loaded.values() for p in prompts))
    opts.ks = sorted(set(opts.ks))
    _check_ks(loaded, runs, opts.ks)
    for prompts in loaded.values():
        score_prompts(prompts, opts.ks)
    ratios = _log_ratios(runs, opts) if opts.kl_model is not None else {}
    metrics: dict[str, dict] = {}
    for name, prompts in loaded.items():
        figures = {"all": aggregate(prompts, opts.ks, opts.bootstrap, opts.seed)}
        if opts.domain_column:
            figures["domains"] = {
                d: aggregate(ps, opts.ks, opts.bootstrap, opts.seed) for d, ps in sorted(_by_domain(prompts).items())
            }
        if opts.base and name != opts.base:
            figures["all"].update(versus_base(prompts, loaded[opts.base], opts.ks))
            for d, ps in _by_domain(prompts).items() if opts.domain_column else ():
                figures["domains"][d].update(versus_base(ps, loaded[opts.base], opts.ks))
        if name in ratios:
            figures["all"].update(kl_figures([g for p in prompts for g in ratios[name][p.prompt_id]]))
            for d, ps in _by_domain(prompts).items() if opts.domain_column else ():
                figures["domains"][d].update(kl_figures([g for p in ps for g in ratios[name][p.prompt_id]]))
        metrics[name] = figures
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_per_prompt(loaded, out_dir / "per_prompt.parquet", opts)
    _write_plots(loaded, metrics, out_dir, opts)
    report = {"k": opts.ks, "base": opts.base, "runs": metrics,
              "best_of_n_kl_bound": {str(k): best_of_n_kl_bound(k) for k in opts.ks},
              "kl_model": None if opts.kl_model is None else str(opts.kl_model),
              "inputs": {name: str(path) for name, path in runs.items()}, "versions": library_versions()}
    write_json(out_dir / "metrics.json", report)
    return report


def _log_ratios(runs: dict[str, Path], opts: EvalOptions) -> dict[str, dict[str, list[float]]]:
    """Every run's per-sequence log-ratios to ``opts.kl_model``, by prompt_id (one model load for all runs)."""
    tokenizer = load_tokenizer(opts.kl_model, "--kl-model")
    model = FrozenModel.load(opts.kl_model, "--kl-model", "auto", opts.device)
    limits = model_limits((opts.kl_model, "--kl-model"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {name: sequence_log_ratios(path, model, tokenizer_hash(tokenizer), limits, pad_id)
            for name, path in runs.items()}


def _write_per_prompt(loaded: dict[str, list[PromptSamples]], path: Path, opts: EvalOptions) -> None:
    rows = []
    for name, prompts in loaded.items():
        for p in prompts:
            row = {"run": name, "prompt_id": p.prompt_id, "domain": p.domain, "n": p.n, "c": p.c,
                   "solve_rate": p.c / p.n, "distinct_correct": distinct_correct(p.answers, p.correct)}
            row.update({f"pass@{k}": p.pass_k[k] for k in opts.ks})
            row.update({f"maj@{k}": p.maj_k[k] for k in opts.ks})
            rows.append(row)
    write_table(path, pa.Table.from_pylist(rows), {"k": opts.ks})


def _write_plots(loaded, metrics, out_dir: Path, opts: EvalOptions) -> None:
    def save(draw, name, *args):
        with atomic_path(out_dir / name) as tmp:
            draw(*args, tmp)

    save(plots.passk_curves, "passk.png", metrics, opts.ks)
    counts = {
        run: {"all": [distinct_correct(p.answers, p.correct) for p in prompts],
              **({d: [distinct_correct(p.answers, p.correct) for p in ps] for d, ps in _by_domain(prompts).items()}
                 if opts.domain_column else {})}
        for run, prompts in loaded.items()
    }
    save(plots.distinct_correct_histogram, "distinct_correct.png", counts)
    if opts.kl_model is not None:
        best_of_n = None if opts.base is None else [
            (best_of_n_kl_bound(k), metrics[opts.base]["all"][f"best_of_{k}_reward"]) for k in opts.ks]
        save(plots.reward_kl, "reward_kl.png", {run: figures["all"] for run, figures in metrics.items()},
             opts.base, best_of_n)
    if opts.base:
        base_rate = {p.prompt_id: p.c / p.n for p in loaded[opts.base]}
        for run, prompts in loaded.items():
            if run == opts.base:
                continue
            pairs: dict[str, list[tuple[float, float]]] = {"all": []}
            for p in prompts:
                if p.prompt_id in base_rate:
                    pair = (base_rate[p.prompt_id], p.c / p.n)
                    pairs["all"].append(pair)
                    if opts.domain_column:
                        pairs.setdefault(p.domain, []).append(pair)
            save(plots.solve_rate_scatter, f"scatter_{run}_vs_{opts.base}.png", run, opts.base, pairs)
