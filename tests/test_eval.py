"""eval: pass@k against exact combinatorics and Monte-Carlo, maj@k, forgetting, ECE, plots, table."""

import json
import os
import signal
import subprocess
import sys
import time
import random
from fractions import Fraction
from math import comb

import matplotlib.image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from cli_runner import ctrl_c_reaches_it, run_cli
from fdivctl.cli.evaluate import metrics_table
from fdivctl.metrics.best_of_n import best_of_n_kl_bound, best_of_n_reward
from fdivctl.metrics.calibration import expected_calibration_error
from fdivctl.metrics.diversity import distinct_correct, distinct_n
from fdivctl.metrics.passk import majority_correct, pass_at_k


@pytest.mark.parametrize(
    "n, c, k",
    [(10, 3, 1), (10, 3, 5), (10, 0, 1), (10, 0, 10), (10, 10, 1), (10, 10, 10), (10, 7, 10), (16, 1, 8),
     (1024, 0, 512), (1024, 1, 1), (1024, 17, 64), (1024, 1000, 1024), (1024, 3, 1000)],
)
def test_pass_at_k_equals_the_exact_combinatorial_value(n, c, k):
    exact = 1 - Fraction(comb(n - c, k), comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)


def test_pass_at_k_matches_a_monte_carlo_estimate():
    rng = random.Random(0)
    n, c, k = 20, 4, 5
    pool = [True] * c + [False] * (n - c)
    hits = sum(any(rng.sample(pool, k)) for _ in range(200_000))
    assert pass_at_k(n, c, k) == pytest.approx(hits / 200_000, abs=0.005)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError, match="1 ≤ k ≤ n"):
        pass_at_k(4, 1, 8)


@pytest.mark.parametrize("seed", range(5))
def test_best_of_n_reward_is_the_mean_max_over_every_subset(seed):
    from itertools import combinations

    rng = random.Random(seed)
    rewards = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(7)]  # ties included
    for n_best in range(1, 8):
        subsets = list(combinations(rewards, n_best))
        assert best_of_n_reward(rewards, n_best) == pytest.approx(sum(map(max, subsets)) / len(subsets), rel=1e-12)
    binary = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert best_of_n_reward(binary, 3) == pytest.approx(pass_at_k(8, 2, 3), rel=1e-12)
    assert best_of_n_kl_bound(1) == 0.0 and best_of_n_kl_bound(2) == pytest.approx(0.6931471805599453 - 0.5)
    with pytest.raises(ValueError, match="1 ≤ N ≤ n"):
        best_of_n_reward(binary, 9)


def test_kl_to_a_model_from_the_runs_own_samples(tmp_path, tiny_teacher):
    """KL(run ‖ model) from recorded log-probs: 0 (to float error) for the model's own samples, > 0 for another
    model's; with --base the best-of-N frontier and reward_kl.png; truncated sampling and token-less tables
    are refused."""
    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", "b", "c"], "prompt": ["Compute 1 + 2.", "Compute 3 * 4.", "1+1="],
                             "answer": ["3", "12", "2"]}), prompts)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sharp = tmp_path / "sharp"  # the teacher with a 10× head: peaked distributions, far from the teacher's
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10)
    model.save_pretrained(sharp)
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(sharp)
    runs = {}
    for name, model, extra in (("self", tiny_teacher, []), ("other", sharp, []),
                               ("nucleus", tiny_teacher, ["--top-p", "0.9"])):
        rollouts, scored = tmp_path / f"{name}.parquet", tmp_path / f"{name}.scored.parquet"
        run_cli("rollout", model, prompts, rollouts, "--n", 4, "--max-new-tokens", 6, "--temperature", 1.3,
                "--device", "cpu", *extra, check=True)
        run_cli("score", rollouts, scored, check=True)
        runs[name] = scored
    done = run_cli("eval", tmp_path / "out", "--run", f"self={runs['self']}", "--run", f"other={runs['other']}",
                   "--base", "self", "--kl-model", tiny_teacher, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["versions"]["torch"] == torch.__version__  # what made the figures
    own, other = report["runs"]["self"]["all"], report["runs"]["other"]["all"]
    assert abs(own["kl"]) < 1e-4 and own["kl_samples"] == 12
    assert other["kl"] > 1.0 and other["kl"] > 3 * other["kl_stderr"]
    assert report["best_of_n_kl_bound"]["4"] == pytest.approx(best_of_n_kl_bound(4))
    assert own["best_of_1_reward"] == pytest.approx(own["mean_reward"])
    assert (tmp_path / "out" / "reward_kl.png").read_bytes()[:4] == b"\x89PNG"
    for spec, message in ((f"nucleus={runs['nucleus']}", "sampled with top-p 0.9"),
                          (f"plain={_scored(tmp_path / 'plain.parquet', [1, 2])}", "missing columns")):
        done = run_cli("eval", tmp_path / "bad", "--run", spec, "--kl-model", tiny_teacher, "--device", "cpu")
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert not (tmp_path / "bad" / "metrics.json").exists()


def test_majority_vote():
    answers = ["1", "2", "2", None, "3"]
    assert majority_correct(answers, [False, True, True, False, False], 3)
    assert not majority_correct(answers, [True, False, False, False, False], 3)
    assert majority_correct(["1", "2"], [True, False], 2)  # tie: the first-seen answer wins
    assert not majority_correct([None, None], [False, False], 2)


def test_diversity_and_calibration():
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert distinct_correct(["a", "b", "a", "c"], [True, True, True, False]) == 2
    assert expected_calibration_error([0.9, 0.9, 0.1, 0.1], [True, False, False, False]) == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)
    assert expected_calibration_error([1.0, 0.0], [True, False]) == 0.0


def _scored(path, solve, n=8, domains=None, extra=None):
    """A scored table: prompt i has solve[i] correct samples out of n, each with its own answer."""
    rows = []
    for i, c in enumerate(solve):
        for s in range(n):
            ok = s < c
            row = {"prompt_id": f"q{i}", "sample_idx": s, "completion": f"\\boxed{{{s if ok else 99}}}",
                   "correct": ok, "reward": float(ok)}
            if domains:
                row["domain"] = domains[i]
            if extra:
                row.update(extra(i, s, ok))
            rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_forgetting_and_newly_solved_on_constructed_runs(tmp_path):
    # base solves q0, q1 at k=8 (c ≥ 1); run loses q1, keeps q0, newly solves q2; q3 stays unsolved
    base = _scored(tmp_path / "base.parquet", [4, 1, 0, 0])
    run = _scored(tmp_path / "run.parquet", [8, 0, 2, 0])
    done = run_cli("eval", tmp_path / "out", "--run", f"base={base}", "--run", f"rl={run}", "--base", "base", "--k", "1,8")
    assert done.returncode == 0, done.stderr
    figures = json.loads((tmp_path / "out" / "metrics.json").read_text())["runs"]["rl"]["all"]
    assert figures["forgetting@8"] == 0.5 and figures["newly_solved@8"] == 0.5
    # at k=1 "solved" means pass@1 ≥ ½: base solves q0 only (4/8); the run keeps it, solves nothing new
    assert figures["forgetting@1"] == 0.0 and figures["newly_solved@1"] == 0.0
    assert figures["pass@1"] == pytest.approx((1 + 0 + 0.25 + 0) / 4)
    assert figures["distinct_correct"] == pytest.approx((8 + 0 + 2 + 0) / 4)
    # a run that shares no prompt with the base: undefined, not 0
    other = tmp_path / "other.parquet"
    table = pq.read_table(_scored(other, [8, 0]))
    pq.write_table(table.set_column(0, "prompt_id", pa.array(["z0"] * 8 + ["z1"] * 8)), other)
    done = run_cli("eval", tmp_path / "out2", "--run", f"base={base}", "--run", f"other={other}", "--base", "base")
    assert done.returncode == 0 and "run other shares no prompt_id with --base base" in done.stderr
    figures = json.loads((tmp_path / "out2" / "metrics.json").read_text())["runs"]["other"]["all"]
    assert figures["shared_prompts"] == 0 and figures["forgetting@8"] is None and figures["newly_solved@8"] is None


def test_report_files_plots_and_table_agree(tmp_path):
    domains = ["in", "in", "out", "out", "in", "out"]
    base = _scored(tmp_path / "b.parquet", [8, 3, 1, 0, 5, 2], domains=domains,
                   extra=lambda i, s, ok: {"confidence": 0.8 if ok else 0.3, "greedy": s == 7})
    run = _scored(tmp_path / "r.parquet", [8, 8, 0, 0, 7, 1], domains=domains,
                  extra=lambda i, s, ok: {"confidence": 0.9, "greedy": False})
    out = tmp_path / "out"
    done = run_cli("eval", out, "--run", f"base={base}", "--run", f"rl={run}", "--base", "base",
                   "--k", "1,2,4", "--bootstrap", "300", "--domain-column", "domain")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "metrics.json").read_text())
    base_all = report["runs"]["base"]["all"]
    assert base_all["samples"] == 6 * 7  # the greedy row is not a sample
    assert base_all["greedy_pass@1"] == pytest.approx(1 / 6)  # only q0 has its 8th sample correct
    assert "ece" in base_all and set(report["runs"]["rl"]["domains"]) == {"in", "out"}
    lo, hi = base_all["pass@2_ci95"]
    assert lo <= base_all["pass@2"] <= hi
    per_prompt = pq.read_table(out / "per_prompt.parquet")
    assert per_prompt.num_rows == 12 and "pass@4" in per_prompt.column_names
    for name in ("passk.png", "distinct_correct.png", "scatter_rl_vs_base.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        pixels = matplotlib.image.imread(out / name)
        assert pixels.std() > 0.05  # not a blank canvas
    console = Console(record=True, width=300)
    console.print(metrics_table(report))
    text = console.export_text()
    for run_name, figures in report["runs"].items():
        line = next(l for l in text.splitlines() if l.strip("│ ").startswith(run_name) and " all " in l)
        for key in ("pass@1", "pass@4", "maj@4", "mean_reward", "distinct_correct"):
            assert f"{figures['all'][key]:.4f}" in line
    assert f"{report['runs']['rl']['all']['forgetting@4']:.4f}" in text
    assert f"{report['runs']['base']['all']['pass@1']:.4f}" in done.stdout


def test_model_shortcut_runs_rollout_score_and_eval(tmp_path, tiny_teacher):
    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", "b"], "prompt": ["Compute 1 + 2.", "Compute 3 * 4."],
                             "answer": ["3", "12"]}), prompts)
    done = run_cli("eval", tmp_path / "out", "--model", tiny_teacher, "--prompts", prompts, "--n", 4,
                   "--k", "1,4", "--max-new-tokens", 6, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    name = tiny_teacher.name
    assert report["runs"][name]["all"]["samples"] == 8
    assert (tmp_path / "out" / f"{name}.scored.parquet").exists()
    # several verifiers, as score takes them: correct is the first one's, the reward their weighted sum
    done = run_cli("eval", tmp_path / "two", "--model", tiny_teacher, "--prompts", prompts, "--n", 4, "--k", "1,4",
                   "--max-new-tokens", 6, "--device", "cpu", "--verifier", "math", "--verifier",
                   "python:user_reward:length_reward", "--reward-weights", "1,0.5")
    assert done.returncode == 0, done.stderr
    scored = pq.read_table(tmp_path / "two" / f"{name}.scored.parquet").to_pylist()
    assert all(r["reward"] == float(r["correct"]) + 0.5 * (len(r["completion"].strip()) <= 3) for r in scored)


def test_several_models_sample_the_same_prompts_with_the_same_seed(tmp_path, tiny_teacher):
    """--model DIR --model NAME=DIR: each model sampled and scored on the same prompts with --sampling-seed, then
    evaluated together; the same model under two names gives the very same samples, another seed others."""
    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", "b"], "prompt": ["Compute 1 + 2.", "Compute 3 * 4."],
                             "answer": ["3", "12"]}), prompts)
    common = ["--prompts", prompts, "--n", 4, "--k", "1,4", "--max-new-tokens", 6, "--device", "cpu"]
    done = run_cli("eval", tmp_path / "out", "--model", tiny_teacher, "--model", f"again={tiny_teacher}", *common)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert sorted(report["runs"]) == sorted([tiny_teacher.name, "again"])
    assert report["runs"]["again"]["all"] == report["runs"][tiny_teacher.name]["all"]

    def completions(path):
        return pq.read_table(path).sort_by([("prompt_id", "ascending"), ("sample_idx", "ascending")]).column(
            "completion").to_pylist()

    first = completions(tmp_path / "out" / f"{tiny_teacher.name}.scored.parquet")
    assert first == completions(tmp_path / "out" / "again.scored.parquet")
    run_cli("eval", tmp_path / "seed1", "--model", f"other={tiny_teacher}", "--sampling-seed", 1, *common, check=True)
    assert completions(tmp_path / "seed1" / "other.scored.parquet") != first


def test_default_k_is_powers_of_two_up_to_the_fewest_samples(tmp_path):
    """--k auto (the default): 1, 2, 4 when one run has 5 samples per prompt and the other 8."""
    five, eight = _scored(tmp_path / "five.parquet", [1, 2], n=5), _scored(tmp_path / "eight.parquet", [1, 2])
    done = run_cli("eval", tmp_path / "out", "--run", f"five={five}", "--run", f"eight={eight}")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["k"] == [1, 2, 4] and "pass@4" in report["runs"]["five"]["all"]
    assert "pass@8" not in report["runs"]["eight"]["all"]
    done = run_cli("eval", tmp_path / "out8", "--run", f"eight={eight}", "--k", "auto")
    assert json.loads((tmp_path / "out8" / "metrics.json").read_text())["k"] == [1, 2, 4, 8]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--k", "1,16"], "has n=8 samples, fewer than k=16"),
        (["--base", "nope"], "--base 'nope' is not one of the runs"),
        (["--k", "a,b"], "expected comma-separated integers"),
        (["--answers", "vibes"], "--answers 'vibes'; valid: math, text"),
        (["--domain-column", "lang"], "missing column 'lang'"),
        (["--bootstrap", "-5"], "--bootstrap must be ≥ 0"),  # was a numpy traceback
    ],
)
def test_bad_eval_input(tmp_path, args, message):
    scored = _scored(tmp_path / "s.parquet", [1, 2])
    done = run_cli("eval", tmp_path / "out", "--run", f"s={scored}", *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_bad_model_shortcut_options_are_refused_before_sampling(tmp_path, tiny_teacher):
    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt_id": ["a"], "prompt": ["Compute 1 + 2."], "answer": ["3"]}), prompts)
    scored = _scored(tmp_path / "s.parquet", [1, 2])
    for args, message in [
        (["--bootstrap", "-1"], "--bootstrap must be ≥ 0"),
        (["--base", "nope"], "--base 'nope' is not one of the runs"),
        (["--run", f"{tiny_teacher.name}={scored}"], f"its run would be named {tiny_teacher.name!r} (its "
         "directory's name), which a --run already uses"),
        (["--model", f"{tiny_teacher.name}={tiny_teacher}"], f"its run would be named {tiny_teacher.name!r} "
         "(given), which another --model already uses"),
        (["--model", "=x"], "expected DIR or NAME=DIR"),
    ]:
        done = run_cli("eval", tmp_path / "out", "--model", tiny_teacher, "--prompts", prompts, "--device", "cpu",
                       *args)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert not (tmp_path / "out").exists()


def test_bad_run_spec_and_unscored_file(tmp_path):
    assert "expected NAME=FILE" in run_cli("eval", tmp_path / "o", "--run", "nofile").stderr
    pq.write_table(pa.table({"prompt_id": ["a"], "completion": ["x"]}), tmp_path / "raw.parquet")
    done = run_cli("eval", tmp_path / "o", "--run", f"r={tmp_path / 'raw.parquet'}")
    assert done.returncode == 2 and "missing column 'correct'" in done.stderr


@pytest.mark.parametrize("column, value, message", [
    ("reward", float("nan"), "column 'reward' is nan in row 3: it must be finite"),
    ("correct", None, "column 'correct' is null in row 3"),
    ("confidence", float("inf"), "column 'confidence' is inf in row 3"),
])
def test_a_missing_or_non_finite_score_is_refused(tmp_path, column, value, message):
    """Before: a NaN reward made mean_reward NaN (and metrics.json invalid JSON); a null correct counted as wrong."""
    extra = lambda i, s, ok: {"confidence": 0.5, **({column: value} if (i, s) == (0, 3) else {})}  # noqa: E731
    scored = _scored(tmp_path / "s.parquet", [1, 2], extra=extra)
    done = run_cli("eval", tmp_path / "out", "--run", f"s={scored}")
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_an_interrupted_model_shortcut_continues_when_run_again(tmp_path, tiny_teacher):
    """Ctrl-C while eval --model samples leaves the finished parts; the same command again continues them (before:
    refused with 'pass --resume', an option eval does not have)."""
    prompts = tmp_path / "p.parquet"
    # enough prompts that sampling runs on well after its first part (with 96 a fast machine finished first)
    pq.write_table(pa.table({"prompt_id": [f"q{i}" for i in range(256)], "prompt": ["Compute 1 + 2."] * 256,
                             "answer": ["3"] * 256}), prompts)
    args = ["eval", tmp_path / "out", "--model", tiny_teacher, "--prompts", prompts, "--n", 2, "--k", "1,2",
            "--max-new-tokens", 24, "--device", "cpu"]
    parts = tmp_path / "out" / f"{tiny_teacher.name}.rollouts.parquet.parts"
    process = subprocess.Popen([sys.executable, "-m", "fdivctl", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               preexec_fn=ctrl_c_reaches_it)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and not list(parts.glob("part-*.parquet")):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and list(parts.glob("part-*.parquet")), err
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["runs"][tiny_teacher.name]["all"]["samples"] \
        == 512 and not parts.exists()
