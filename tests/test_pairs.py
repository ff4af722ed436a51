"""pairs: preference pairs from scored rollouts, and train --algo fdpo on their exact token ids."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_runner import run_cli

from fdivctl.errors import UserError
from fdivctl.io.tables import provenance, write_table
from fdivctl.stages.pairs import make_pairs

IDS = pa.list_(pa.int32())


def _scored(path, rewards: dict[str, list[float]], record=None):
    """A scored rollouts table: prompt p's sample s has reward rewards[p][s] and token ids [s + 3, 7]."""
    rows = [(p, s, r) for p, values in rewards.items() for s, r in enumerate(values)]
    table = pa.table({
        "prompt_id": [p for p, _, _ in rows], "sample_idx": [s for _, s, _ in rows],
        "prompt": [f"prompt {p}" for p, _, _ in rows], "prompt_token_ids": pa.array([[1, 2]] * len(rows), IDS),
        "completion": [f"{p}/{s}" for p, s, _ in rows], "completion_token_ids": pa.array([[s + 3, 7] for _, s, _ in rows],
                                                                                          IDS),
        "completion_logprobs": pa.array([[-1.0, -1.0]] * len(rows), pa.list_(pa.float32())),
        "answer": [f"gold {p}" for p, _, _ in rows],
        "reward": pa.array([r for _, _, r in rows], pa.float32()),
        "correct": [r > 0 for _, _, r in rows],
    })
    write_table(path, table, record or {"tokenizer_hash": "abc"})
    return path


def test_best_against_worst_by_hand(tmp_path):
    scored = _scored(tmp_path / "s.parquet", {"a": [0.5, 1.0, 0.0, 1.0], "b": [1.0, 1.0], "c": [0.2, 0.9, 0.4]})
    summary = make_pairs(scored, tmp_path / "p.parquet", per_prompt=4)
    rows = pq.read_table(tmp_path / "p.parquet").to_pylist()
    # a: best {1, 3} × worst {2}: both pairs; b: all alike, none; c: 1 over 0
    assert [(r["prompt_id"], r["chosen_sample_idx"], r["rejected_sample_idx"]) for r in rows] == \
        [("a", 1, 2), ("a", 3, 2), ("c", 1, 0)]
    assert summary == {"pairs": 3, "prompts": 3, "prompts_paired": 2, "mean_reward_margin": pytest.approx(0.9)}
    first = rows[0]
    assert first["chosen"] == "a/1" and first["rejected"] == "a/2" and first["chosen_reward"] == 1.0
    assert first["chosen_token_ids"] == [4, 7] and first["rejected_token_ids"] == [5, 7]
    assert first["prompt_token_ids"] == [1, 2] and first["answer"] == "gold a" and first["prompt"] == "prompt a"
    assert not {"completion", "reward", "correct", "completion_logprobs", "sample_idx"} & set(first)
    record = provenance(tmp_path / "p.parquet")
    assert record["tokenizer_hash"] == "abc" and record["per_prompt"] == 4 and record["stage"] == "pairs"
    # a margin: c's 0.7 is not above 0.8
    make_pairs(scored, tmp_path / "m.parquet", per_prompt=4, min_margin=0.8)
    assert pq.read_table(tmp_path / "m.parquet").column("prompt_id").to_pylist() == ["a", "a"]


def test_the_draw_is_seeded_by_prompt_not_row_order(tmp_path):
    rewards = {"a": [1.0, 1.0, 1.0, 0.0, 0.0, 0.0], "b": [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]}
    scored = _scored(tmp_path / "s.parquet", rewards)
    make_pairs(scored, tmp_path / "p.parquet", per_prompt=2, seed=3)
    table = pq.read_table(scored)
    shuffled = tmp_path / "shuffled.parquet"
    write_table(shuffled, table.take(list(reversed(range(table.num_rows)))), {"tokenizer_hash": "abc"})
    make_pairs(shuffled, tmp_path / "q.parquet", per_prompt=2, seed=3)

    def picked(path):
        return sorted((r["prompt_id"], r["chosen_sample_idx"], r["rejected_sample_idx"])
                      for r in pq.read_table(path).to_pylist())

    assert picked(tmp_path / "p.parquet") == picked(tmp_path / "q.parquet")
    pairs = picked(tmp_path / "p.parquet")
    assert len(pairs) == 4 and len(set(pairs)) == 4  # 2 distinct pairs per prompt, out of 9 combinations each
    assert all(rewards[p][c] == 1.0 and rewards[p][r] == 0.0 for p, c, r in pairs)
    make_pairs(scored, tmp_path / "other.parquet", per_prompt=2, seed=4)
    assert picked(tmp_path / "other.parquet") != pairs  # another seed, another draw (9² choices for two prompts)


@pytest.mark.parametrize("rewards, args, message", [
    ({"a": [1.0, 1.0], "b": [0.0, 0.0]}, {}, "no pair: every prompt's samples score within --min-margin 0"),
    ({"a": [1.0, 0.0]}, {"per_prompt": 0}, "--per-prompt must be ≥ 1"),
    ({"a": [1.0, 0.0]}, {"min_margin": -1.0}, "--min-margin must be ≥ 0"),
    ({"a": [1.0, float("nan")]}, {}, "column 'reward' is nan in row 1"),
])
def test_bad_input_is_refused(tmp_path, rewards, args, message):
    scored = _scored(tmp_path / "s.parquet", rewards)
    with pytest.raises(UserError, match=message):
        make_pairs(scored, tmp_path / "p.parquet", **args)
    assert not (tmp_path / "p.parquet").exists()


def test_unscored_rollouts_are_refused_by_the_cli(tmp_path):
    table = pq.read_table(_scored(tmp_path / "s.parquet", {"a": [1.0, 0.0]})).drop(["reward", "correct"])
    pq.write_table(table, tmp_path / "raw.parquet")
    done = run_cli("pairs", tmp_path / "raw.parquet", tmp_path / "p.parquet")
    assert done.returncode == 2 and "missing column 'reward' (scored rollouts" in done.stderr, done.stderr


def test_rollout_score_pairs_fdpo_trains_on_the_sampled_tokens(tmp_path, tiny_teacher):
    """At temperature 1 the rollout's log-probs are the policy's own: f-DPO's reference log-probs of the pairs (the
    initial policy's, on the pairs' token ids) equal the sums the rollout recorded for those very samples."""
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", "b", "c"], "prompt": ["Compute 1 + 2.", "the cat", "7 + 8 ="]}),
                   prompts)
    rollouts, scored, pairs = tmp_path / "r.parquet", tmp_path / "s.parquet", tmp_path / "p.parquet"
    run_cli("rollout", tiny_teacher, prompts, rollouts, "--n", 4, "--max-new-tokens", 8, "--device", "cpu",
            check=True)
    run_cli("score", rollouts, scored, "--verifier", "python:user_reward:char_count_reward", "--workers", 1,
            check=True)
    done = run_cli("pairs", scored, pairs, "--per-prompt", 2)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["pairs"] >= 3 and summary["mean_reward_margin"] > 0
    out = tmp_path / "fdpo"
    done = run_cli("train", tiny_teacher, out, "--algo", "fdpo", "--pairs", pairs, "--divergence", "jsd",
                   "--max-steps", 2, "--batch-size", 2, "--device", "cpu", "--log-jsonl", tmp_path / "log.jsonl")
    assert done.returncode == 0, done.stderr
    sampled = {(r["prompt_id"], r["sample_idx"]): sum(r["completion_logprobs"])
               for r in pq.read_table(rollouts).to_pylist()}
    reference = pq.read_table(out / "fdivctl_run" / "reference_logprobs.parquet").to_pylist()
    for pair, ref in zip(pq.read_table(pairs).to_pylist(), reference, strict=True):
        assert ref["ref_chosen_logp"] == pytest.approx(sampled[pair["prompt_id"], pair["chosen_sample_idx"]], abs=1e-4)
        assert ref["ref_rejected_logp"] == pytest.approx(sampled[pair["prompt_id"], pair["rejected_sample_idx"]],
                                                         abs=1e-4)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all("reward_accuracy" in step for step in log)


def test_token_id_pairs_of_another_tokenizer_are_refused(tmp_path, tiny_teacher):
    pairs = tmp_path / "p.parquet"
    make_pairs(_scored(tmp_path / "s.parquet", {"a": [1.0, 0.0]}, {"tokenizer_hash": "0" * 64}), pairs)
    done = run_cli("train", tiny_teacher, tmp_path / "fdpo", "--algo", "fdpo", "--pairs", pairs, "--max-steps", 1,
                   "--batch-size", 1, "--device", "cpu")
    assert done.returncode == 2 and "tokenizer mismatch" in done.stderr, done.stderr
    done = run_cli("train", tiny_teacher, tmp_path / "chat", "--algo", "fdpo", "--pairs", pairs, "--chat",
                   "--max-steps", 1, "--batch-size", 1, "--device", "cpu")
    assert done.returncode == 2 and "these pairs hold token ids" in done.stderr, done.stderr
