"""Sequences and prompts a model cannot take: token ids outside its vocabulary, more tokens than its context.

Before these checks an out-of-range id was a torch IndexError traceback from the first forward pass that met it,
and a sequence past the context was scored (and trained on) silently; rollout generated past the context.
"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cli_runner import run_cli
from conftest import write_sequences
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, Qwen2Config

from fdivctl import tiny
from fdivctl.io.checkpoints import context_length

CONTEXT = 32
SENTENCE = "Compute 3 * 4. "  # 8 tokens of the test tokenizer


@pytest.fixture(scope="module")
def short(tmp_path_factory, tokenizer_dir):
    """A tiny Qwen2 whose config gives it a 32-token context."""
    path = tmp_path_factory.mktemp("short")
    tiny.make_model(path, AutoTokenizer.from_pretrained(tokenizer_dir), seed=3, hidden=64, layers=1,
                    max_positions=CONTEXT)
    return path


@pytest.fixture(scope="module")
def vocab(short):
    return json.loads((short / "config.json").read_text())["vocab_size"]


def _with_token(source, out, row: int, value: int):
    """``source`` with the fourth completion token of ``row`` replaced by ``value``."""
    table = pq.read_table(source)
    column = table.column("completion_token_ids").to_pylist()
    column[row][3] = value
    index = table.column_names.index("completion_token_ids")
    pq.write_table(table.set_column(index, "completion_token_ids", pa.array(column, table.schema[index].type)), out)
    return out


def test_context_length_reads_positions_and_rope_scaling():
    assert context_length(Qwen2Config(max_position_embeddings=4096)) == 4096
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert context_length(Qwen2Config(max_position_embeddings=32768, rope_scaling=yarn)) == 131072
    llama3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    assert context_length(LlamaConfig(max_position_embeddings=131072, rope_scaling=llama3)) == 131072
    assert context_length(GPT2Config(n_positions=1024)) == 1024


@pytest.mark.parametrize("value, message", [(10**6, "token id 1000000, outside the"), (-5, "token id -5, outside")])
def test_out_of_vocabulary_ids_are_refused_before_any_work(tmp_path, short, vocab, value, message):
    data = _with_token(write_sequences(tmp_path / "ok.parquet", vocab, 4, 5, 6, seed=0), tmp_path / "bad.parquet",
                       2, value)
    done = run_cli("teacher-logits", short, data, tmp_path / "store", "--k", 4, "--device", "cpu")
    assert done.returncode == 2 and f"row 2 (prompt_id 'p2') has {message}" in done.stderr, done.stderr
    assert f"{vocab}-id vocabulary of the teacher" in done.stderr and not (tmp_path / "store").exists()
    done = run_cli("distill", short, tmp_path / "out", "--loss", "ce", "--data", data, "--device", "cpu")
    assert done.returncode == 2 and message in done.stderr and "of the student" in done.stderr, done.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_sequences_longer_than_the_context_are_refused(tmp_path, short, student, vocab):
    fits = write_sequences(tmp_path / "fits.parquet", vocab, 3, 12, CONTEXT - 12, seed=0)
    long = write_sequences(tmp_path / "long.parquet", vocab, 3, 12, CONTEXT - 11, seed=0)
    store = tmp_path / "store"
    run_cli("teacher-logits", short, fits, store, "--k", 4, "--device", "cpu", check=True)
    done = run_cli("teacher-logits", short, long, tmp_path / "long-store", "--k", 4, "--device", "cpu")
    assert done.returncode == 2 and f"has {CONTEXT + 1} tokens, more than the {CONTEXT}-token context of the " \
        f"teacher {short}" in done.stderr, done.stderr
    # the tightest of the run's models sets the bound: the 512-token student with the 32-token teacher
    done = run_cli("distill", student, tmp_path / "out", "--teacher", short, "--data", long, "--device", "cpu")
    assert done.returncode == 2 and f"context of the teacher {short}" in done.stderr, done.stderr
    done = run_cli("distill", student, tmp_path / "out", "--teacher", short, "--data", fits, "--eval-data", long,
                   "--device", "cpu")
    assert done.returncode == 2 and "long.parquet: row 0" in done.stderr, done.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_preference_pairs_longer_than_the_context_are_refused(tmp_path, short):
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["1+2=", SENTENCE * 5], "chosen": [" three", " a"], "rejected": [" b", " c"]}),
                   pairs)
    done = run_cli("train", short, tmp_path / "out", "--algo", "fdpo", "--pairs", pairs, "--device", "cpu")
    assert done.returncode == 2 and "pairs.parquet: row 1 (prompt_id '1') has" in done.stderr, done.stderr
    assert f"{CONTEXT}-token context of the policy" in done.stderr


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """Four prompts of 4 to about 24 tokens, one row each."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    texts = ["1+2=", "Compute 1 + 2.", SENTENCE * 2, SENTENCE * 3]
    pq.write_table(pa.table({"prompt_id": [f"q{i}" for i in range(4)], "prompt": texts,
                             "answer": ["1", "2", "3", "4"]}), path)
    return path


def test_rollout_stops_each_completion_at_the_context(tmp_path, short, prompts):
    out = tmp_path / "r.parquet"
    run_cli("rollout", short, prompts, out, "--temperature", 0, "--max-new-tokens", 100, "--batch-size", 4,
            "--device", "cpu", check=True)
    rows = pq.read_table(out).to_pylist()
    model = AutoModelForCausalLM.from_pretrained(short, dtype=torch.float32).eval()
    lengths = [len(r["prompt_token_ids"]) for r in rows]
    assert len(set(lengths)) == 4 and max(lengths) > CONTEXT // 2  # left padding differs across the batch
    for r in rows:
        prompt, completion = r["prompt_token_ids"], r["completion_token_ids"]
        assert len(prompt) + len(completion) <= CONTEXT
        if r["finish_reason"] == "length":
            assert len(prompt) + len(completion) == CONTEXT
        # the batched, left-padded run keeps what the prompt alone generates, and its log-probs
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=len(completion), do_sample=False)
        assert alone[0, len(prompt):].tolist() == completion
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(r["completion_logprobs"]), expected, atol=1e-4, rtol=0)
    assert any(r["finish_reason"] == "length" and len(r["completion_token_ids"]) < 100 for r in rows)


def _second_prompt_refused_before_sampling(tmp_path, short, student, prompts, text: str) -> list[str]:
    """rollout, online train and on-policy distill on ``prompts`` with its second prompt replaced by ``text``: each
    exits 2 before sampling, writing nothing; their stderr."""
    table = pq.read_table(prompts)
    bad = tmp_path / "bad.parquet"
    pq.write_table(table.set_column(1, "prompt", pa.array(["1+2=", text, "2+2=", "3+3="])), bad)
    runs = [("rollout", short, bad, tmp_path / "r.parquet"),
            ("train", short, tmp_path / "rl", "--prompts", bad, "--verifier", "math", "--iterations", 1),
            ("distill", student, tmp_path / "opd", "--on-policy", "--prompts", bad, "--teacher", short)]
    errors = []
    for args in runs:
        done = run_cli(*args, "--device", "cpu")
        assert done.returncode == 2, done.stderr
        errors.append(done.stderr)
    assert not (tmp_path / "r.parquet").exists() and not (tmp_path / "r.parquet.parts").exists()
    assert not (tmp_path / "rl" / "model.safetensors").exists() and not (tmp_path / "opd" / "model.safetensors").exists()
    return errors


def test_prompts_that_fill_the_context_are_refused_before_sampling(tmp_path, short, student, prompts):
    tokens = len(AutoTokenizer.from_pretrained(short)(SENTENCE * 5)["input_ids"])
    assert tokens >= CONTEXT
    message = f"prompt_id 'q1' has {tokens} tokens: it fills the {CONTEXT}-token context"
    rollout, train, distill = _second_prompt_refused_before_sampling(tmp_path, short, student, prompts, SENTENCE * 5)
    assert message in rollout and message in train, (rollout, train)
    assert message in distill and f"teacher {short}" in distill, distill


def test_prompts_of_no_tokens_are_refused_before_sampling(tmp_path, short, student, prompts):
    """An empty prompt (the test tokenizer adds no BOS) gives a model nothing to sample its first token from."""
    assert AutoTokenizer.from_pretrained(short)("")["input_ids"] == []
    for stderr in _second_prompt_refused_before_sampling(tmp_path, short, student, prompts, ""):
        assert "prompt_id 'q1': the prompt is no tokens" in stderr, stderr


def test_eval_kl_model_refuses_sequences_past_its_context(tmp_path, short, tiny_teacher, prompts):
    rollouts, scored = tmp_path / "r.parquet", tmp_path / "r.scored.parquet"
    run_cli("rollout", tiny_teacher, prompts, rollouts, "--n", 2, "--max-new-tokens", 30, "--device", "cpu",
            check=True)
    run_cli("score", rollouts, scored, "--workers", 1, check=True)
    done = run_cli("eval", tmp_path / "out", "--run", f"run={scored}", "--kl-model", short, "--device", "cpu")
    assert done.returncode == 2 and f"context of the --kl-model {short}" in done.stderr, done.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_on_policy_samples_stop_at_the_tightest_context_of_the_run(tmp_path, short, student, prompts):
    """The 512-token student samples for the 32-token teacher: each sequence stops within the teacher's context."""
    log = tmp_path / "log.jsonl"
    run_cli("distill", student, tmp_path / "opd", "--on-policy", "--prompts", prompts, "--teacher", short,
            "--max-new-tokens", 100, "--samples-per-prompt", 1, "--batch-size", 4, "--max-steps", 1, "--device", "cpu", "--log-jsonl", log,
            check=True)
    record = json.loads(log.read_text().splitlines()[-1])
    tokenizer = AutoTokenizer.from_pretrained(short)
    room = sum(CONTEXT - len(tokenizer(t)["input_ids"]) for t in pq.read_table(prompts).column("prompt").to_pylist())
    assert 0 < record["tokens"] <= room, (record, room)
