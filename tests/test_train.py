"""`fdivctl train` end to end on a tiny Qwen2 pre-trained (SFT) on the demo task: online and staged GRPO,
DPH-RL partition and training, f-DPO, resume, and bad input."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from artifacts import check_dph_partition, dph_prompts, read_jsonl, staged_run, weights
from cli_runner import run_cli

from fdivctl.io.checkpoints import load_causal_lm

VERIFIER = ["--verifier", "regex", "--pattern", r"^\s*[1-3]\+"]  # a real verifiable reward: the first digit is 1-3
SAMPLING = ["--max-new-tokens", "10", "--group-size", "4", "--prompts-per-iteration", "4"]


def _accuracy(root, model, tmp_path, name):
    """Share of samples whose first digit is 1-3, over every training prompt (4 samples each, fixed seed)."""
    rollouts = tmp_path / f"{name}.parquet"
    run_cli("rollout", model, root / "data" / "prompts.parquet", rollouts, "--n", 4, "--seed", 99,
            "--max-new-tokens", 10, "--device", "cpu", check=True)
    run_cli("score", rollouts, tmp_path / f"{name}.scored.parquet", "--verifier", "regex", "--pattern",
            r"^\s*[1-3]\+", "--workers", 1, check=True)
    return pq.read_table(tmp_path / f"{name}.scored.parquet").column("correct").to_numpy().mean()


def test_online_grpo_raises_the_reward(task, tmp_path):
    out = tmp_path / "grpo"
    done = run_cli("train", task / "sft", out, "--prompts", task / "data" / "prompts.parquet", *VERIFIER,
                   "--max-new-tokens", 10, "--group-size", 8, "--prompts-per-iteration", 8, "--iterations", 12,
                   "--ppo-epochs", 2, "--lr", "1e-3", "--device", "cpu", "--log-jsonl", tmp_path / "log.jsonl")
    assert done.returncode == 0, done.stderr
    log = read_jsonl(tmp_path / "log.jsonl")
    assert [r["iteration"] for r in log] == list(range(1, 13))
    for key in ("reward_mean", "accuracy", "pass_histogram", "entropy", "clip_frac", "response_length",
                "tokens_per_s", "grad_norm"):
        assert key in log[0]
    assert sorted((out / "fdivctl_run").iterdir())[0].name == "iter-0001.scored.parquet"
    before, after = _accuracy(task, task / "sft", tmp_path, "before"), _accuracy(task, out, tmp_path, "after")
    assert after > before + 0.15, (before, after)


def test_staged_and_online_give_the_same_update(task, tmp_path):
    common = ["--lr", "1e-3", "--device", "cpu", "--divergence", "rkl", "--div-coef", "0.1", "--minibatch-size", 8,
              "--micro-batch-size", 3]
    online = tmp_path / "online"
    run_cli("train", task / "sft", online, "--prompts", task / "data" / "prompts.parquet", *VERIFIER, *SAMPLING,
            "--iterations", 1, *common, check=True)
    scored = online / "fdivctl_run" / "iter-0001.scored.parquet"
    staged = tmp_path / "staged"
    run_cli("train", task / "sft", staged, "--rollouts", scored, *common, check=True)
    a, b = weights(online), weights(staged)
    assert any(not torch.equal(a[k], weights(task / "sft")[k]) for k in a)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


@pytest.mark.parametrize("estimator", ["full", "k3"])
def test_chunk_size_changes_memory_not_the_update(task, scored_rollouts, tmp_path, estimator):
    """--chunk-size 5 cuts every head pass (policy loss; full-vocabulary rkl to the reference, or the reference's
    token log-probs for k3) into 5-token chunks: the same update as the default single chunk, up to fp32
    summation order; 0 is refused."""
    common = ["--divergence", "rkl", "--div-estimator", estimator, "--div-coef", "0.1"]
    default = staged_run(task, scored_rollouts, tmp_path / "default", *common)
    chunked = staged_run(task, scored_rollouts, tmp_path / "chunked", *common, "--chunk-size", 5)
    assert [r["grad_norm"] for r in chunked] == pytest.approx([r["grad_norm"] for r in default], rel=1e-5)
    assert [r["divergence"] for r in chunked] == pytest.approx([r["divergence"] for r in default], rel=1e-5)
    a, b, start = weights(tmp_path / "default"), weights(tmp_path / "chunked"), weights(task / "sft")
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    # Adam's first step is lr·g/(|g| + ε) per weight: where a gradient cancels to near ε, fp32 summation order alone
    # moves that weight by a visible share of lr (1e-3); seen: 2.8e-6, and 1.1e-5 with other micro-batches
    apart = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved > 1e-3 and 0 < apart < 1e-4, (moved, apart)  # 0 would mean no chunking happened
    done = run_cli("train", task / "sft", tmp_path / "bad", "--rollouts", scored_rollouts, "--chunk-size", 0)
    assert done.returncode == 2 and "--chunk-size must be ≥ 1, got 0" in done.stderr


def test_online_resume_equals_an_uninterrupted_run(task, tmp_path):
    common = ["--prompts", task / "data" / "prompts.parquet", *VERIFIER, *SAMPLING, "--lr", "1e-3",
              "--device", "cpu"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    run_cli("train", task / "sft", whole, *common, "--iterations", 2, check=True)
    run_cli("train", task / "sft", part, *common, "--iterations", 1, check=True)
    again = run_cli("train", task / "sft", part, *common, "--iterations", 2)
    assert again.returncode == 2 and "--resume" in again.stderr
    run_cli("train", task / "sft", part, *common, "--iterations", 2, "--resume", check=True)
    a, b = weights(whole), weights(part)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    # the run's settings are in its checkpoint: another pattern or group size does not continue it
    for extra, message in ((["--pattern", "^1"], "verifier.pattern: "), (["--group-size", 2], "online.group_size: 4 → 2")):
        done = run_cli("train", task / "sft", part, *common, *extra, "--iterations", 3, "--resume")
        assert done.returncode == 2 and message in done.stderr, done.stderr


@pytest.fixture(scope="module")
def partition(task, tmp_path_factory):
    """A DPH partition where half the prompts are always right and half never (:func:`artifacts.dph_prompts`)."""
    root = tmp_path_factory.mktemp("dph")
    prompts = dph_prompts(task, root / "prompts.parquet")
    done = run_cli("train", task / "sft", root / "partition", "--algo", "dph", "--partition", "--prompts", prompts,
                   "--verifier", "regex", "--k", 4, "--max-new-tokens", 10, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    return root


def test_dph_partition_splits_and_stores_reference_samples(partition):
    check_dph_partition(partition / "prompts.parquet", partition / "partition", k=4)


def test_dph_training_logs_both_losses(task, partition, tmp_path):
    out = tmp_path / "dph"
    done = run_cli("train", task / "sft", out, "--algo", "dph", "--partition-dir", partition / "partition",
                   "--prompts", partition / "prompts.parquet", "--verifier", "regex", "--max-new-tokens", 10,
                   "--group-size", 4, "--prompts-per-iteration", 4, "--iterations", 2, "--divergence", "jsd",
                   "--eta", 0.2, "--lr", "1e-3", "--device", "cpu", "--log-jsonl", tmp_path / "log.jsonl")
    assert done.returncode == 0, done.stderr
    log = read_jsonl(tmp_path / "log.jsonl")
    assert all("pef_loss" in r and "pg_loss" in r for r in log)
    record = json.loads((partition / "partition" / "partition.json").read_text())
    assert all(r["pef_prompts"] == record["pef_prompts"] and r["exp_prompts"] == record["exp_prompts"] for r in log)
    assert log[0]["pef_loss"] == pytest.approx(0.0, abs=1e-5)  # π_θ = π_0 at the first step
    pef = set(json.loads((partition / "partition" / "partition.json").read_text())["pef_prompt_ids"])
    sampled = pq.read_table(out / "fdivctl_run" / "iter-0001.scored.parquet").column("prompt_id").to_pylist()
    assert not pef & set(sampled)  # online RL explores D_exp only


def test_fdpo_trains_and_caches_reference_logprobs(task, tmp_path):
    prompts = pq.read_table(task / "data" / "prompts.parquet").column("prompt").to_pylist()[:8]
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": prompts, "chosen": [" 1+1"] * 8, "rejected": [" 9+9"] * 8}), pairs)
    out = tmp_path / "fdpo"
    common = ["--algo", "fdpo", "--pairs", pairs, "--divergence", "jsd", "--beta", 0.5, "--lr", "3e-3",
              "--batch-size", 4, "--lr-schedule", "constant", "--device", "cpu"]
    run_cli("train", task / "sft", out, *common, "--max-steps", 6, "--log-jsonl", tmp_path / "log.jsonl",
            check=True)
    log = read_jsonl(tmp_path / "log.jsonl")
    assert log[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # π_θ = π_ref: −log σ(0)
    assert log[-1]["reward_margin"] > 0 and log[-1]["reward_accuracy"] == 1.0
    assert (out / "fdivctl_run" / "reference_logprobs.parquet").exists()
    # a null response is named by its own column
    pq.write_table(pa.table({"prompt": prompts[:2], "chosen": [" 1+1"] * 2, "rejected": [" 9+9", None]}), pairs)
    done = run_cli("train", task / "sft", tmp_path / "bad", *common)
    assert done.returncode == 2 and "column 'rejected' is null in row 1" in done.stderr
    # given reference log-probs: both columns, finite (a NaN stopped the run as a 'non-finite loss')
    base = {"prompt": prompts[:2], "chosen": [" 1+1"] * 2, "rejected": [" 9+9"] * 2}
    for extra, message in (({"ref_chosen_logp": [-1.0, -2.0]}, "has ref_chosen_logp but not ref_rejected_logp"),
                           ({"ref_chosen_logp": [-1.0, float("nan")], "ref_rejected_logp": [-1.0, -2.0]},
                            "column 'ref_chosen_logp' is nan in row 1"),
                           ({"ref_chosen_logp": [-1.0, -2.0], "ref_rejected_logp": [None, -2.0]},
                            "column 'ref_rejected_logp' is null in row 0")):
        pq.write_table(pa.table({**base, **extra}), pairs)
        done = run_cli("train", task / "sft", tmp_path / "bad", *common)
        assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "bad").exists()
    # TRL's names for them (DPOTrainer's precompute_ref_log_probs) are read too: given values that put the chosen
    # response far above the reference, the first loss is -log σ(β(u_w - u_l)) of them, not log 2
    given = [[0.0, 0.0], [-30.0, -30.0]]
    for names in (("ref_chosen_logp", "ref_rejected_logp"), ("ref_chosen_logps", "ref_rejected_logps")):
        pq.write_table(pa.table({**base, **dict(zip(names, given))}), pairs)
        out = tmp_path / names[0]
        run_cli("train", task / "sft", out, *common, "--max-steps", 1, "--log-jsonl", out.with_suffix(".jsonl"),
                check=True)
        assert not (out / "fdivctl_run" / "reference_logprobs.parquet").exists()
    logs = [read_jsonl(tmp_path / f"{name}.jsonl")[0]["loss"] for name in ("ref_chosen_logp", "ref_chosen_logps")]
    assert logs[0] == logs[1] and abs(logs[0] - 0.6931) > 0.1
    pq.write_table(pa.table({**base, "ref_chosen_logps": [-1.0, -2.0]}), pairs)
    done = run_cli("train", task / "sft", tmp_path / "bad", *common)
    assert done.returncode == 2 and "has ref_chosen_logps but not ref_rejected_logps" in done.stderr, done.stderr


def test_fdpo_nll_term_keeps_the_chosen_likelihood(task, tmp_path):
    """--nll-coef α (Iterative RPO's DPO+NLL): the loss is the f-DPO loss plus α × the chosen responses' NLL per
    token, logged as chosen_nll; at π_θ = π_ref the f-DPO part is log 2; trained with it, the chosen responses end
    more likely than trained without it, from the same start."""
    prompts = pq.read_table(task / "data" / "prompts.parquet").column("prompt").to_pylist()[:8]
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": prompts, "chosen": [" 1+1=2"] * 8, "rejected": [" 9+9=18"] * 8}), pairs)
    common = ["--algo", "fdpo", "--pairs", pairs, "--beta", 0.1, "--lr", "3e-3", "--batch-size", 4,
              "--max-steps", 6, "--device", "cpu"]
    logs = {}
    for alpha in (0.0, 1.0):
        log = tmp_path / f"{alpha}.jsonl"
        run_cli("train", task / "sft", tmp_path / str(alpha), *common, "--nll-coef", alpha, "--log-jsonl", log,
                check=True)
        logs[alpha] = read_jsonl(log)
    plain, rpo = logs[0.0], logs[1.0]
    assert plain[0]["chosen_nll"] == pytest.approx(rpo[0]["chosen_nll"], rel=1e-6)  # the same first batch
    assert rpo[0]["preference_loss"] == pytest.approx(math.log(2), abs=1e-4)
    for step in rpo:
        assert step["loss"] == pytest.approx(step["preference_loss"] + step["chosen_nll"], rel=1e-5)
    assert "preference_loss" not in plain[0] and plain[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert rpo[-1]["chosen_nll"] < rpo[0]["chosen_nll"] - 0.5 and rpo[-1]["chosen_nll"] < plain[-1]["chosen_nll"] - 1
    assert rpo[-1]["reward_margin"] > 0.3  # and the preference is still learnt
    done = run_cli("train", task / "sft", tmp_path / "bad", *common, "--nll-coef", -1)
    assert done.returncode == 2 and "--nll-coef must be ≥ 0 and finite; got -1.0" in done.stderr, done.stderr
    done = run_cli("train", task / "sft", tmp_path / "bad", "--algo", "sft", "--data", pairs, "--nll-coef", 1)
    assert done.returncode == 2 and "--nll-coef is RPO's NLL term of --algo fdpo" in done.stderr, done.stderr
    assert not (tmp_path / "bad").exists()


def test_fdpo_reads_implicit_prompt_text_pairs_as_trl_does(task, tmp_path):
    """Text chosen/rejected with no prompt column (Anthropic HH's layout): the shared opening, less a trailing
    space, is the prompt, as TRL's extract_prompt splits them; the same sequences as the explicit layout (was:
    refused for its missing prompt column)."""
    from transformers import AutoTokenizer

    from fdivctl.stages.preference import _pairs

    tokenizer = AutoTokenizer.from_pretrained(task / "sft")
    prompts = ["Human: 1+1?\n\nAssistant:", "Human: 2+2?\n\nAssistant:"]
    explicit, implicit = tmp_path / "explicit.parquet", tmp_path / "implicit.parquet"
    pq.write_table(pa.table({"prompt": prompts, "chosen": [" 2", " 4"], "rejected": [" 3", " 5 or so"]}), explicit)
    pq.write_table(pa.table({"chosen": [p + c for p, c in zip(prompts, [" 2", " 4"])],
                             "rejected": [p + r for p, r in zip(prompts, [" 3", " 5 or so"])]}), implicit)
    for want, got in zip(_pairs(explicit, tokenizer, False)[:2], _pairs(implicit, tokenizer, False)[:2]):
        assert [x.tolist() for x in got.prompt_tokens] == [x.tolist() for x in want.prompt_tokens]
        assert [x.tolist() for x in got.completion_tokens] == [x.tolist() for x in want.completion_tokens]
    common = ["--algo", "fdpo", "--max-steps", 1, "--batch-size", 2, "--device", "cpu"]
    run_cli("train", task / "sft", tmp_path / "fdpo", "--pairs", implicit, *common, check=True)
    for chosen, rejected, message in ((["a b"], ["c d"], "row 0: chosen and rejected open with different text"),
                                      (["a b"], ["a b"], "row 0 has an empty chosen response")):
        pq.write_table(pa.table({"chosen": chosen, "rejected": rejected}), implicit)
        done = run_cli("train", task / "sft", tmp_path / "bad", "--pairs", implicit, *common)
        assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "bad").exists()


def test_bad_input_one_line_exit_2(task, tmp_path):
    rollouts = tmp_path / "r.parquet"
    run_cli("rollout", task / "sft", task / "data" / "prompts.parquet", rollouts, "--n", 2, "--max-new-tokens", 6,
            "--device", "cpu", check=True)
    cases = {
        "no reward column": ["--rollouts", rollouts],
        "group": None,
        "mismatch": None,
    }
    done = run_cli("train", task / "sft", tmp_path / "o1", *cases["no reward column"])
    assert done.returncode == 2 and "no reward column" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    single = tmp_path / "single.parquet"
    run_cli("rollout", task / "sft", task / "data" / "prompts.parquet", single, "--n", 1, "--max-new-tokens", 6,
            "--device", "cpu", check=True)
    run_cli("score", single, tmp_path / "single.scored.parquet", "--verifier", "regex", "--pattern", "1", check=True)
    done = run_cli("train", task / "sft", tmp_path / "o2", "--rollouts", tmp_path / "single.scored.parquet")
    assert done.returncode == 2 and "groups of at least 2" in done.stderr
    other = tmp_path / "other_tok"
    from fdivctl import tiny
    tiny.train_tokenizer(other)
    run_cli("demo", "init", other, tmp_path / "other_model", "--hidden", 64, "--layers", 1, check=True)
    run_cli("score", rollouts, tmp_path / "r.scored.parquet", "--verifier", "regex", "--pattern", "1", check=True)
    done = run_cli("train", tmp_path / "other_model", tmp_path / "o3", "--rollouts", tmp_path / "r.scored.parquet")
    assert done.returncode == 2 and "tokenizer mismatch" in done.stderr
    done = run_cli("train", task / "sft", tmp_path / "o4", "--rollouts", tmp_path / "r.scored.parquet",
                   "--prompts", task / "data" / "prompts.parquet")
    assert done.returncode == 2 and "one of them" in done.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_f_divergence_sft_runs_against_the_initial_policy(task, tmp_path):
    """--algo sft --divergence D: rkl is plain SFT (same update), hellinger keeps the reference term (another one)."""
    common = ["--algo", "sft", "--data", task / "data" / "sft.parquet", "--lr", "3e-3", "--batch-size", 8,
              "--max-steps", 3, "--lr-schedule", "constant", "--device", "cpu"]
    for name, extra in (("plain", []), ("rkl", ["--divergence", "rkl"]), ("hellinger", ["--divergence", "hellinger"])):
        run_cli("train", task / "sft", tmp_path / name, *common, *extra, "--log-jsonl", tmp_path / f"{name}.jsonl",
                check=True)
    plain, rkl, hellinger = (weights(tmp_path / n) for n in ("plain", "rkl", "hellinger"))
    assert all(torch.allclose(plain[k], rkl[k], atol=1e-4) for k in plain)  # seen: 1.6e-5 apart (fp32 rounding)
    plain_log, rkl_log = read_jsonl(tmp_path / "plain.jsonl"), read_jsonl(tmp_path / "rkl.jsonl")
    assert [r["grad_norm"] for r in rkl_log] == pytest.approx([r["grad_norm"] for r in plain_log], rel=1e-4)
    assert rkl_log[0]["sft"] == pytest.approx(0.0, abs=1e-6)  # π_θ = π_ref: −log π_θ(y) + log π_ref(y) = 0
    assert max(float((plain[k] - hellinger[k]).abs().max()) for k in plain) > 1e-3
    assert all("sft" in r for r in read_jsonl(tmp_path / "hellinger.jsonl"))
    done = run_cli("train", task / "sft", tmp_path / "bad", *common, "--divergence", "fkl")
    assert done.returncode == 2 and "f(0) = ∞" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = run_cli("train", task / "sft", tmp_path / "bad", *common, "--divergence", "jsd", "--ref-logits", tmp_path)
    assert done.returncode == 2 and "not --ref-logits" in done.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("args, message", [
    (["--minibatch-size", 0], "--minibatch-size must be ≥ 1"),
    (["--max-steps", 0], "--max-steps must be ≥ 1 (leave it out for --epochs over the data), got 0"),
    (["--prompts", "PROMPTS", *VERIFIER, "--score-workers", 0], "--score-workers must be ≥ 1, got 0"),
    # before: "use --n 1", an option train does not have, after the policy had been loaded
    (["--prompts", "PROMPTS", *VERIFIER, "--temperature", 0], "online RL samples its groups: --temperature must be > 0"),
])
def test_bad_counts_are_refused_before_any_work(task, tmp_path, args, message):
    inputs = [] if "--prompts" in args else ["--rollouts", tmp_path / "unread.parquet"]
    args = [task / "data" / "prompts.parquet" if a == "PROMPTS" else a for a in args]
    done = run_cli("train", task / "sft", tmp_path / "o", *inputs, *args, "--device", "cpu")
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "o").exists()


def test_a_non_finite_reward_is_named_by_row(task, scored_rollouts, tmp_path):
    table = pq.read_table(scored_rollouts)
    rewards = table.column("reward").to_pylist()
    rewards[4] = float("inf")
    bad = tmp_path / "bad.parquet"
    pq.write_table(table.set_column(table.column_names.index("reward"), "reward", pa.array(rewards, pa.float32())), bad)
    done = run_cli("train", task / "sft", tmp_path / "o", "--rollouts", bad, "--device", "cpu")
    assert done.returncode == 2 and "column 'reward' is inf in row 4: it must be finite" in done.stderr


def test_dynamic_sampling_with_only_equal_reward_groups_warns_that_nothing_was_trained(task, scored_rollouts,
                                                                                      tmp_path):
    table = pq.read_table(scored_rollouts)
    flat = tmp_path / "flat.parquet"
    pq.write_table(table.set_column(table.column_names.index("reward"), "reward",
                                    pa.array([1.0] * table.num_rows, pa.float32())), flat)
    done = run_cli("train", task / "sft", tmp_path / "o", "--rollouts", flat, "--dynamic-sampling", "--device", "cpu")
    assert done.returncode == 0 and json.loads(done.stdout)["steps"] == 0
    assert "warning: no response of" in done.stderr and "holds the starting policy" in done.stderr, done.stderr


@pytest.mark.parametrize("value, message", [(float("nan"), "completion_logprobs[1] is nan"),
                                            (0.5, "completion_logprobs[1] is 0.5, not the log-prob")])
def test_recorded_logprobs_must_be_logprobs(task, scored_rollouts, tmp_path, value, message):
    """The old policy's log-probs are checked with the file (a NaN stopped the run as a 'non-finite loss' at its
    first step, a positive value trained on)."""
    table = pq.read_table(scored_rollouts)
    logprobs = table.column("completion_logprobs").to_pylist()
    logprobs[2][1] = value
    bad = tmp_path / "bad.parquet"
    column = table.column_names.index("completion_logprobs")
    pq.write_table(table.set_column(column, "completion_logprobs", pa.array(logprobs, pa.list_(pa.float32()))), bad)
    done = run_cli("train", task / "sft", tmp_path / "o", "--rollouts", bad, "--device", "cpu")
    assert done.returncode == 2 and f"bad.parquet: row 2: {message}" in done.stderr, done.stderr
    assert not (tmp_path / "o").exists()


def test_a_missing_or_unreadable_rollouts_file_is_one_line(task, tmp_path):
    """The staged run reads the file's provenance first: it went to pyarrow unchecked (a traceback, exit 1)."""
    (tmp_path / "junk.parquet").write_text("not parquet")
    for name, message in (("missing.parquet", "missing.parquet: no such file"),
                          ("junk.parquet", "junk.parquet: not a readable Parquet file")):
        done = run_cli("train", task / "sft", tmp_path / "o", "--rollouts", tmp_path / name, "--device", "cpu")
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_online_prompts_with_a_null_or_repeated_id_are_refused(task, tmp_path):
    prompts = pq.read_table(task / "data" / "prompts.parquet")
    ids = prompts.column("prompt_id").to_pylist()
    for name, bad_ids, message in (("null", [None] + ids[1:], "column 'prompt_id' is null in row 0"),
                                   ("repeated", ids[:2] + ids[:1] + ids[3:], f"prompt_id {ids[0]!r} is in rows 0 and 2")):
        pq.write_table(prompts.set_column(0, "prompt_id", pa.array(bad_ids, pa.string())), tmp_path / f"{name}.parquet")
        done = run_cli("train", task / "sft", tmp_path / "o", "--prompts", tmp_path / f"{name}.parquet", *VERIFIER,
                       *SAMPLING, "--device", "cpu")
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert not (tmp_path / "o" / "model.safetensors").exists()


def test_a_verifier_error_scores_zero_and_the_run_goes_on(task, tmp_path):
    done = run_cli("train", task / "sft", tmp_path / "o", "--prompts", task / "data" / "prompts.parquet",
                   "--verifier", "python:user_reward:raises_on_odd", *SAMPLING, "--iterations", 1, "--device", "cpu",
                   "--log-jsonl", tmp_path / "log.jsonl")
    assert done.returncode == 0, done.stderr
    scored = pq.read_table(tmp_path / "o" / "fdivctl_run" / "iter-0001.scored.parquet").to_pylist()
    failed = [r for r in scored if r["sample_idx"] % 2]
    assert failed and all(r["reward"] == 0 and "ValueError" in r["verdict"] for r in failed)
    assert read_jsonl(tmp_path / "log.jsonl")[-1]["verifier_failures"] == len(failed)


def test_an_online_run_sums_several_verifiers_rewards(task, tmp_path):
    """--verifier repeated with --reward-weights: each sample's reward is the weighted sum, its correct the first
    verifier's; a resume with other weights is refused (they are the run's settings)."""
    from fdivctl.demo.task import verify
    from user_reward import length_reward

    common = ["--prompts", task / "data" / "prompts.parquet", "--verifier", "python:fdivctl.demo.task:verify",
              "--verifier", "python:user_reward:length_reward", *SAMPLING, "--device", "cpu"]
    run_cli("train", task / "sft", tmp_path / "o", *common, "--reward-weights", "1,0.5", "--iterations", 1,
            check=True)
    rows = pq.read_table(tmp_path / "o" / "fdivctl_run" / "iter-0001.scored.parquet").to_pylist()
    for row in rows:
        assert row["reward"] == pytest.approx(verify(row["completion"], row) + 0.5 * length_reward(row["completion"],
                                                                                                    row))
        assert row["correct"] == (verify(row["completion"], row) > 0)
    done = run_cli("train", task / "sft", tmp_path / "o", *common, "--reward-weights", "1,0.2", "--iterations", 2,
                   "--resume")
    assert done.returncode == 2 and "weights" in done.stderr, done.stderr


def test_kdrl_with_the_policy_as_teacher_is_plain_grpo(task, scored_rollouts, tmp_path):
    """KL(π‖π) = 0 with zero gradient: one KDRL step equals one GRPO step, and the KD figure is 0."""
    common = ["--rollouts", scored_rollouts, "--lr", "1e-3", "--device", "cpu", "--micro-batch-size", 16]
    run_cli("train", task / "sft", tmp_path / "grpo", *common, check=True)
    run_cli("train", task / "sft", tmp_path / "kdrl", *common, "--teacher", task / "sft", "--kd-coef", 1.0,
            "--log-jsonl", tmp_path / "kdrl.jsonl", check=True)
    (line,) = read_jsonl(tmp_path / "kdrl.jsonl")
    assert abs(line["kd"]) < 1e-9 and line["kd_coef"] == 1.0
    a, b = weights(tmp_path / "grpo"), weights(tmp_path / "kdrl")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-7), key


@pytest.mark.parametrize("mask", ["incorrect", "correct"])
def test_kdrl_reward_guided_mask_and_annealed_coefficient(task, scored_rollouts, tmp_path, mask):
    """The KD term covers exactly the tokens of the masked-in responses, and β decays linearly over the steps."""
    table = pq.read_table(scored_rollouts)
    correct = np.asarray(table.column("correct").to_pylist())
    lengths = np.asarray([len(t) for t in table.column("completion_token_ids").to_pylist()])
    chosen = ~correct if mask == "incorrect" else correct
    log = tmp_path / "log.jsonl"
    run_cli("train", task / "sft", tmp_path / "out", "--rollouts", scored_rollouts, "--lr", "1e-3", "--device", "cpu",
            "--teacher", task / "random", "--kd-coef", "4e-3", "--kd-anneal", "1e-3", "--kd-mask", mask,
            "--kd-estimator", "k3", "--ppo-epochs", 2, "--minibatch-size", len(table) // 2 + 1, "--log-jsonl", log,
            check=True)
    lines = read_jsonl(log)
    assert [round(x["kd_coef"], 9) for x in lines] == [0.004, 0.00325, 0.0025, 0.00175]
    # each epoch's two steps together cover every response once
    assert lines[0]["kd_tokens"] + lines[1]["kd_tokens"] == lengths[chosen & (lengths > 0)].sum()
    assert all((x["kd"] > 0) == (x["kd_tokens"] > 0) for x in lines)
    assert load_causal_lm(tmp_path / "out", device="cpu") is not None


def test_kdrl_bad_input(task, scored_rollouts, tmp_path):
    store = tmp_path / "store"
    cases = {
        "give one teacher": ["--rollouts", scored_rollouts, "--teacher", task / "sft", "--teacher-logits", store],
        "--kd-mask 'wrong'; valid: all, incorrect, correct": ["--rollouts", scored_rollouts, "--teacher",
                                                              task / "sft", "--kd-mask", "wrong"],
        "--kd-estimator 'k1'; valid: k2, k3, full": ["--rollouts", scored_rollouts, "--teacher", task / "sft",
                                                     "--kd-estimator", "k1"],
        "--teacher-logits holds fixed sequences": ["--prompts", task / "data" / "prompts.parquet", *VERIFIER,
                                                   "--teacher-logits", store],
    }
    for message, args in cases.items():
        done = run_cli("train", task / "sft", tmp_path / "o", *args, "--device", "cpu")
        assert done.returncode == 2 and message in done.stderr, (message, done.stderr)
        assert not (tmp_path / "o" / "model.safetensors").exists()


def test_linear_anneal():
    from fdivctl.schedules.anneal import linear_anneal

    assert linear_anneal(5e-3, None, 0.7) == 5e-3
    assert linear_anneal(5e-3, 1e-3, 0.0) == 5e-3 and linear_anneal(5e-3, 1e-3, 2.0) == 1e-3
    assert abs(linear_anneal(5e-3, 1e-3, 0.5) - 3e-3) < 1e-15


def test_kdrl_from_a_full_store_equals_the_online_teacher(task, scored_rollouts, tmp_path):
    """--teacher-logits with a k = V store and the closed-form KD gives the loss and gradient the teacher model gives."""
    vocab = load_causal_lm(task / "random", device="cpu").config.vocab_size
    store = tmp_path / "store"
    run_cli("teacher-logits", task / "random", scored_rollouts, store, "--k", vocab, "--dtype", "fp32",
            "--device", "cpu", check=True)
    common = ["--rollouts", scored_rollouts, "--lr", "1e-3", "--device", "cpu", "--kd-estimator", "full",
              "--kd-coef", "0.05"]
    run_cli("train", task / "sft", tmp_path / "model", *common, "--teacher", task / "random",
            "--log-jsonl", tmp_path / "model.jsonl", check=True)
    run_cli("train", task / "sft", tmp_path / "store_run", *common, "--teacher-logits", store,
            "--log-jsonl", tmp_path / "store.jsonl", check=True)
    (a,), (b,) = read_jsonl(tmp_path / "model.jsonl"), read_jsonl(tmp_path / "store.jsonl")
    assert a["kd"] > 0
    # Adam's first step is ~lr·sign(g): compare the loss and the gradient, not the weights
    for key in ("kd", "loss", "grad_norm"):
        assert abs(a[key] - b[key]) <= 1e-4 * abs(a[key]), (key, a[key], b[key])


def test_rlad_mixture_logprob():
    from fdivctl.objectives.rlad import mixture_logprob

    teacher, old = torch.tensor([-1.0, -3.0, -0.2]), torch.tensor([-2.0, -0.5, -0.2])
    expected = torch.log(0.3 * teacher.exp() + 0.7 * old.exp())
    torch.testing.assert_close(mixture_logprob(teacher, old, 0.3), expected)
    assert torch.equal(mixture_logprob(teacher, old, 0.0), old) and torch.equal(mixture_logprob(teacher, old, 1.0),
                                                                                 teacher)


def test_rlad_lambda_zero_is_grpo_and_the_teacher_moves_the_update(task, scored_rollouts, tmp_path):
    common = ["--rollouts", scored_rollouts, "--lr", "1e-3", "--device", "cpu", "--micro-batch-size", 16]
    run = {}
    for name, extra in {"grpo": [], "rlad0": ["--algo", "rlad", "--teacher", task / "random", "--mix-lambda", 0],
                        "rlad": ["--algo", "rlad", "--teacher", task / "random", "--mix-lambda", 0.5]}.items():
        run_cli("train", task / "sft", tmp_path / name, *common, *extra, "--log-jsonl", tmp_path / f"{name}.jsonl",
                check=True)
        run[name] = read_jsonl(tmp_path / f"{name}.jsonl")[0]
    for key in ("loss", "grad_norm", "clip_frac"):
        assert run["rlad0"][key] == run["grpo"][key], key
    assert "kd" not in run["rlad"] and abs(run["rlad"]["loss"] - run["grpo"]["loss"]) > 1e-4
    done = run_cli("train", task / "sft", tmp_path / "x", "--algo", "rlad", *common)
    assert done.returncode == 2 and "--algo rlad needs a teacher" in done.stderr


def test_gaussian_curriculum_weights_and_draws():
    from fdivctl.schedules.curriculum import draw, gaussian_weights

    w = gaussian_weights(torch.tensor([0.5, 0.1, 0.9, 0.3]), mu=0.5, sigma=0.2)
    torch.testing.assert_close(w, torch.tensor([1.0, np.exp(-2.0), np.exp(-2.0), np.exp(-0.5)], dtype=torch.float64))
    picks = [draw(torch.tensor([1.0, 1e-9, 1e-9, 1.0]), 2, seed) for seed in range(20)]
    assert all(sorted(p) == [0, 3] for p in picks)
    assert sorted(draw(w, 10, 0)) == [0, 1, 2, 3]


def test_online_gaussian_curriculum_tracks_accuracy_and_resumes(task, tmp_path):
    """Iteration 2's prompts come from the accuracies measured in iteration 1; a resumed run picks the same."""
    from fdivctl.stages.train_rl import OnlineOptions, _pick_prompts, _tracked_accuracy

    args = ["--prompts", task / "data" / "prompts.parquet", *VERIFIER, *SAMPLING, "--lr", "1e-3", "--device", "cpu",
            "--prompt-sampling", "gaussian", "--gcs-sigma", "0.1"]
    full = tmp_path / "full"
    run_cli("train", task / "sft", full, *args, "--iterations", 2, check=True)
    artifacts = full / "fdivctl_run"
    seen = _tracked_accuracy(artifacts, 1)
    assert len(seen) == 4 and all(0 <= a <= 1 for a in seen.values())
    rows = pq.read_table(task / "data" / "prompts.parquet").to_pylist()
    online = OnlineOptions(prompts_per_iteration=4, prompt_sampling="gaussian", gcs_sigma=0.1)
    expected = sorted(str(rows[i]["prompt_id"]) for i in _pick_prompts(rows, 1, online, 0, seen))
    second = pq.read_table(artifacts / "iter-0002.scored.parquet").column("prompt_id").to_pylist()
    assert sorted({str(p) for p in second}) == expected
    # interrupted after iteration 1, resumed: the same second iteration
    part = tmp_path / "part"
    run_cli("train", task / "sft", part, *args, "--iterations", 1, check=True)
    run_cli("train", task / "sft", part, *args, "--iterations", 2, "--resume", check=True)
    a, b = weights(full), weights(part)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_prompt_sampling_is_checked(task, tmp_path):
    done = run_cli("train", task / "sft", tmp_path / "o", "--prompts", task / "data" / "prompts.parquet", *VERIFIER,
                   "--prompt-sampling", "hard-first", "--device", "cpu")
    assert done.returncode == 2 and "--prompt-sampling 'hard-first'; valid: uniform, gaussian" in done.stderr
    prompts = pq.read_table(task / "data" / "prompts.parquet")
    for bad in (1.5, "high"):
        path = tmp_path / "prompts.parquet"
        pq.write_table(prompts.drop_columns([c for c in ["pass_rate"] if c in prompts.column_names])
                       .append_column("pass_rate", pa.array([bad] * prompts.num_rows)), path)
        done = run_cli("train", task / "sft", tmp_path / "o", "--prompts", path, *VERIFIER, "--prompt-sampling",
                       "gaussian", "--device", "cpu")
        assert done.returncode == 2 and f"row 0 has pass_rate {bad!r}" in done.stderr, done.stderr
        assert not (tmp_path / "o" / "model.safetensors").exists()


def _shifted_logprobs(scored, out, shift: float):
    """``scored`` as if its sampler had given every token of the even rows ``shift`` less log-prob."""
    table = pq.read_table(scored)
    column = [[lp - shift * (i % 2 == 0) for lp in row]
              for i, row in enumerate(table.column("completion_logprobs").to_pylist())]
    index = table.column_names.index("completion_logprobs")
    pq.write_table(table.set_column(index, "completion_logprobs", pa.array(column, pa.list_(pa.float32()))), out)
    lengths = [len(row) for row in table.column("completion_token_ids").to_pylist()]
    return out, sum(n for i, n in enumerate(lengths) if i % 2 == 0) / sum(lengths)


def test_truncated_importance_sampling_corrects_a_sampler_mismatch(task, scored_rollouts, tmp_path):
    """--tis-cap: the PPO ratio is taken against the trainer's own π_old (so nothing clips on the first pass) and
    each token is weighted by min(π_old/π_sampler, C): exp(0.5) where the sampler said 0.5 nats less, C past it."""
    common = ["--ppo-epochs", 1, "--clip-low", 0.2, "--clip-high", 0.2]
    shifted, share = _shifted_logprobs(scored_rollouts, tmp_path / "shifted.parquet", 0.5)
    plain = staged_run(task, shifted, tmp_path / "plain", *common)[0]
    assert plain["clip_frac"] > 0.05 and plain["logprob_gap"] == pytest.approx(0.5 * share, rel=1e-3)
    tis = staged_run(task, shifted, tmp_path / "tis", *common, "--tis-cap", 2)[0]
    assert tis["clip_frac"] == 0 and tis["tis_capped_frac"] == 0
    assert tis["tis_weight"] == pytest.approx(share * math.exp(0.5) + (1 - share), rel=1e-4)
    far, _ = _shifted_logprobs(scored_rollouts, tmp_path / "far.parquet", 1.0)
    capped = staged_run(task, far, tmp_path / "capped", *common, "--tis-cap", 2)[0]
    assert capped["tis_capped_frac"] == pytest.approx(share, rel=1e-6)
    assert capped["tis_weight"] == pytest.approx(share * 2 + (1 - share), rel=1e-4)
    # with the sampler and the trainer agreeing, TIS changes nothing
    a = staged_run(task, scored_rollouts, tmp_path / "a", *common)[0]
    b = staged_run(task, scored_rollouts, tmp_path / "b", *common, "--tis-cap", 2)[0]
    assert b["tis_weight"] == pytest.approx(1.0, abs=1e-5)
    # at π = π_old the surrogate's loss is Σ w_t A_t, zero up to rounding (seen: −2.2e-8): compare it absolutely
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4) and b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    done = run_cli("train", task / "sft", tmp_path / "bad", "--rollouts", scored_rollouts, "--tis-cap", 0.5)
    assert done.returncode == 2 and "--tis-cap must be ≥ 1" in done.stderr


def test_micro_batches_take_similar_lengths_together_without_changing_the_update(task, scored_rollouts, tmp_path):
    """A step's responses go into micro-batches longest first, so each pads to little more than its own rows (was:
    in the step's shuffled order, a long response padding its whole micro-batch); which micro-batch a response is
    in changes the update only by summation order: micro-batches of 2 give one micro-batch's update."""
    from fdivctl.stages.policy_update import PolicyUpdate
    from fdivctl.stages.rl_data import ScoredRollouts

    data = ScoredRollouts.from_table(pq.read_table(scored_rollouts), str(scored_rollouts))
    lengths = data.seqs.lengths()
    rows = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    ordered = PolicyUpdate._longest_first(data, rows)
    assert sorted(ordered) == sorted(rows) and [lengths[r] for r in ordered] == sorted(lengths, reverse=True)

    def padded(order):  # tokens the micro-batches of 2 pad to
        return sum(2 * max(lengths[r] for r in order[i : i + 2]) for i in range(0, len(order), 2))

    assert padded(ordered) < padded(rows)
    common = ["--ppo-epochs", 1, "--divergence", "rkl", "--div-coef", "0.1"]
    small = staged_run(task, scored_rollouts, tmp_path / "small", *common, "--micro-batch-size", 2)
    whole = staged_run(task, scored_rollouts, tmp_path / "whole", *common, "--micro-batch-size", 1024)
    assert [r["grad_norm"] for r in small] == pytest.approx([r["grad_norm"] for r in whole], rel=1e-5)
    assert [r["loss"] for r in small] == pytest.approx([r["loss"] for r in whole], rel=1e-4, abs=1e-6)


def test_tensorboard_gets_each_rl_steps_figures(task, scored_rollouts, tmp_path):
    """train --tensorboard: the RL loop's records (clip fraction, divergence, ...) as scalars at their steps, the
    same values as --log-jsonl's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = staged_run(task, scored_rollouts, tmp_path / "run", "--divergence", "rkl", "--div-coef", 0.1,
                         "--ppo-epochs", 2, "--tensorboard", tmp_path / "board")
    events = EventAccumulator(str(tmp_path / "board"))
    events.Reload()
    for tag in ("loss", "clip_frac", "divergence", "logprob_gap"):
        points = events.Scalars(tag)
        assert [p.step for p in points] == [r["step"] for r in records] and len(points) > 1
        assert [p.value for p in points] == pytest.approx([r[tag] for r in records], rel=1e-6)
