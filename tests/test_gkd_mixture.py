"""GKD's mixture (Agarwal et al. 2024, Algorithm 1; TRL GKDTrainer's ``lmbda``): ``distill --on-policy --data SEQS
--on-policy-fraction λ`` takes each micro-batch as the student's samples with probability λ, else the table's own
completions.  Before: on-policy (λ = 1, from a prompts table) or offline (λ = 0), nothing in between."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_runner import run_cli


def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("gkd") / "sft.parquet"
    pq.write_table(pa.table({"prompt_id": [f"p{i}" for i in range(8)], "prompt": [f"{i}+{i}=" for i in range(8)],
                             "completion": [f" {2 * i}" for i in range(8)]}), path)
    return path


def _run(student, teacher, out, data, *extra):
    return run_cli("distill", student, out, "--data", data, "--teacher", teacher, "--loss", "jsd", "--batch-size", 2,
                   "--grad-accum", 2, "--max-new-tokens", 4, "--samples-per-prompt", 1, "--device", "cpu",
                   "--log-jsonl", out.with_suffix(".jsonl"), *extra)


def test_the_mixture_draws_per_micro_batch_reproducibly_and_its_ends_are_the_two_modes(tmp_path, student,
                                                                                        tiny_teacher, data):
    common = ["--max-steps", 6]
    assert _run(student, tiny_teacher, tmp_path / "mix", data, "--on-policy", "--on-policy-fraction", 0.5,
                *common).returncode == 0
    shares = [r["on_policy_share"] for r in _log(tmp_path / "mix.jsonl")]
    assert all(share in (0.0, 0.5, 1.0) for share in shares)  # a step's 2 micro-batches: none, one or both sampled
    assert 0 < sum(shares) / len(shares) < 1  # both kinds were drawn
    assert _run(student, tiny_teacher, tmp_path / "again", data, "--on-policy", "--on-policy-fraction", 0.5,
                *common).returncode == 0
    assert [r["loss"] for r in _log(tmp_path / "again.jsonl")] == [r["loss"] for r in _log(tmp_path / "mix.jsonl")]
    # λ near 0: the data's completions only, the offline run's numbers; λ = 1: samples only
    run_cli("distill", student, tmp_path / "off", "--data", data, "--teacher", tiny_teacher, "--loss", "jsd",
            "--batch-size", 2, "--grad-accum", 2, "--device", "cpu", "--log-jsonl", tmp_path / "off.jsonl", *common,
            check=True)
    assert _run(student, tiny_teacher, tmp_path / "low", data, "--on-policy", "--on-policy-fraction", 1e-9,
                *common).returncode == 0
    low = _log(tmp_path / "low.jsonl")
    assert [r["loss"] for r in low] == [r["loss"] for r in _log(tmp_path / "off.jsonl")]
    assert all(r["on_policy_share"] == 0.0 for r in low)
    # a data micro-batch reports its rows' completion length: 2 micro-batches of 2 rows, 4 rows a step
    assert all(r["response_length"] == pytest.approx(r["tokens"] / 4) for r in low)
    assert _run(student, tiny_teacher, tmp_path / "all", data, "--on-policy", "--on-policy-fraction", 1,
                "--max-steps", 2).returncode == 0
    assert all(r["on_policy_share"] == 1.0 and "response_length" in r for r in _log(tmp_path / "all.jsonl"))


@pytest.mark.parametrize("extra, message", [
    (["--on-policy-fraction", 0.5], "give it with --on-policy and --data SEQS.parquet"),
    (["--on-policy", "--on-policy-fraction", 0], "--on-policy-fraction λ (0 < λ ≤ 1)"),
    (["--on-policy", "--on-policy-fraction", 0.5, "--loss", "opd"], "under one divergence: --loss jsd, fkl, … (not "
                                                                     "opd)"),
])
def test_bad_mixtures_are_one_line(tmp_path, student, tiny_teacher, data, extra, message):
    done = _run(student, tiny_teacher, tmp_path / "out", data, *extra)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()
