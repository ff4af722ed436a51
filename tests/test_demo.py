"""The quickstart (`fdivctl demo run --quick`): every stage runs and every contract holds; the science is reported,
not asserted (issue: the comparison itself needs the full budget)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runner import run_cli
from fdivctl.demo import pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_script_is_the_pipeline():
    assert (ROOT / "examples" / "quickstart.sh").read_text() == pipeline.script(quick=False)


def test_the_script_passes_the_pipelines_arguments_with_out_expanded():
    """What bash hands fdivctl for each line of the script is exactly the pipeline's arguments with $OUT set (a
    quoted 'name=$OUT/…' reached fdivctl as a literal $OUT)."""
    commands = [line.removeprefix("fdivctl ") for line in pipeline.script(quick=True).splitlines()
                if line.startswith("fdivctl ")]
    expected = [[a.replace("$OUT", "/runs/q") for a in args] for _, args in pipeline.steps("$OUT", quick=True)]
    for words, args in zip(commands, expected, strict=True):
        done = subprocess.run(["bash", "-c", f'OUT=/runs/q; printf "%s\\0" {words}'], capture_output=True,
                              text=True, check=True)
        assert done.stdout.split("\0")[:-1] == args


def test_quick_demo_runs_every_stage(tmp_path):
    out = tmp_path / "qs"
    done = run_cli("demo", "run", out, "--quick")
    assert done.returncode == 0, done.stderr
    for name in (*pipeline.EVALUATED, *pipeline.STUDENTS):
        assert (out / name / "config.json").exists(), name
        assert (out / "samples" / f"{name}.scored.parquet").exists(), name
    for name in ("metrics.json", "REPORT.md", "passk.png", "distinct_correct.png", "reward_kl.png", "per_prompt.parquet",
                 "teacher-logits/manifest.json", "dph-partition/partition.json", "grpo.jsonl"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    ks = metrics["k"]
    for run, figures in metrics["runs"].items():
        for group in (figures["all"], *figures["domains"].values()):
            curve = [group[f"pass@{k}"] for k in ks]
            assert curve == sorted(curve), (run, curve)
    assert set(metrics["runs"]["sft"]["domains"]) == {"in", "out"}
    assert metrics["runs"]["sft"]["all"]["mean_reward"] > metrics["runs"]["random"]["all"]["mean_reward"]
    assert abs(metrics["runs"]["sft"]["all"]["kl"]) < 1e-3  # the initial policy's own samples
    assert metrics["runs"]["random"]["all"]["kl"] > metrics["runs"]["grpo"]["all"]["kl"]
    report = (out / "REPORT.md").read_text()
    assert all(f"| {name} | in |" in report for name in pipeline.EVALUATED)


@pytest.mark.slow
def test_erpd_example_runs(tmp_path):
    """examples/erpd.sh at SCALE=quick: stage 1, the stage-1 store, stage 2 under the trust region, eval."""
    done = _run_example("erpd.sh", tmp_path / "erpd")
    assert done.returncode == 0, done.stderr[-2000:]
    log = [json.loads(line) for line in (tmp_path / "erpd" / "erpd.jsonl").read_text().splitlines()]
    assert log and all("trust_region_kept" in line for line in log)
    metrics = json.loads((tmp_path / "erpd" / "report" / "metrics.json").read_text())
    assert sorted(metrics["runs"]) == ["base", "erpd", "stage1"] and metrics["base"] == "base"


def _run_example(name: str, out: Path) -> subprocess.CompletedProcess:
    """examples/NAME at SCALE=quick, with this interpreter's fdivctl first on the PATH."""
    env = {**os.environ, "SCALE": "quick", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(ROOT / "examples" / name), str(out)], env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_on_policy_distill_example_runs(tmp_path):
    """examples/on_policy_distill.sh at SCALE=quick: a teacher, an SFT-warmed student, four on-policy students,
    their gradient noise and eval."""
    out = tmp_path / "opd"
    done = _run_example("on_policy_distill.sh", out)
    assert done.returncode == 0, done.stderr[-2000:]
    for name, figure in (("opd", "advantage_rms"), ("vopd", "rkl"), ("rkl", "rkl"), ("jsd", "jsd")):
        log = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert len(log) == 4 and all(figure in step for step in log), name
    assert "vopd: mean advantage_rms" in done.stdout
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert sorted(metrics["runs"]) == ["jsd", "opd", "rkl", "student", "teacher", "vopd"]
    assert abs(metrics["runs"]["teacher"]["all"]["kl"]) < 1e-3  # the teacher's own samples


@pytest.mark.slow
def test_fdpo_example_runs(tmp_path):
    """examples/fdpo.sh at SCALE=quick: a policy, its scored samples, pairs, f-DPO with rkl, fkl and jsd each without
    and with RPO's NLL term, every model evaluated by one eval --model call."""
    out = tmp_path / "fdpo"
    done = _run_example("fdpo.sh", out)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = [f"fdpo-{d}{nll}" for d in ("rkl", "fkl", "jsd") for nll in ("", "-nll")]
    for run in runs:
        log = [json.loads(line) for line in (out / f"{run}.jsonl").read_text().splitlines()]
        assert len(log) == 4 and all("reward_accuracy" in step for step in log), run
        assert ("preference_loss" in log[0]) == run.endswith("-nll"), run
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert sorted(metrics["runs"]) == sorted([*runs, "policy"])
    assert metrics["base"] == "policy" and "forgetting@4" in metrics["runs"]["fdpo-rkl"]["all"]


@pytest.mark.slow
def test_iterative_rpo_example_runs(tmp_path):
    """examples/iterative_rpo.sh at SCALE=quick: two rounds of sample → score → pairs → f-DPO + NLL, each from the
    last round's model (its reference), every model evaluated together."""
    out = tmp_path / "rpo"
    done = _run_example("iterative_rpo.sh", out)
    assert done.returncode == 0, done.stderr[-2000:]
    for t in range(2):
        log = [json.loads(line) for line in (out / f"iter{t}.fdpo.jsonl").read_text().splitlines()]
        assert len(log) == 4 and "chosen_nll" in log[0] and "preference_loss" in log[0]
        assert log[0]["preference_loss"] == pytest.approx(0.6931, abs=1e-3)  # each round starts at its reference
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert sorted(metrics["runs"]) == ["m0", "m1", "m2"] and metrics["base"] == "m0"


def test_demo_init_refuses_a_hidden_size_without_whole_heads(tmp_path):
    run_cli("demo", "data", tmp_path / "data", "--sft-per-prompt", 2, check=True)
    done = run_cli("demo", "init", tmp_path / "data" / "tokenizer", tmp_path / "m", "--hidden", 32)
    assert done.returncode == 2 and "--hidden must be a positive multiple of 64" in done.stderr
    assert not (tmp_path / "m").exists()
