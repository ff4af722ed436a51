"""rollout (hf backend) on a tiny random Qwen2: schema, log-probs, seeds, resume, shards, errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fdivctl.generation.sampling import SamplingOptions
from fdivctl.io.tables import provenance
from fdivctl.stages.rollout import RolloutOptions, run_rollout
from cli_runner import run_cli

PROMPTS = ["Compute 1 + 2.", "Compute 3 * 4.", "Compute 9 - 1.", "Compute 10 + 10.", "Compute 7 * 7."]


def _cli(*args):
    return run_cli(*args)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    pq.write_table(
        pa.table({"prompt_id": [f"q{i}" for i in range(len(PROMPTS))], "prompt": PROMPTS,
                  "answer": ["3", "12", "8", "20", "49"], "level": pa.array([1, 2, 1, 2, 3], pa.int8())}),
        path,
    )
    return path


ARGS = ["--n", 3, "--max-new-tokens", 12, "--temperature", 0.8, "--top-k", 50, "--seed", 7,
        "--batch-size", 2, "--device", "cpu"]


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory, tiny_teacher, prompts):
    out = tmp_path_factory.mktemp("rollouts") / "r.parquet"
    done = _cli("rollout", tiny_teacher, prompts, out, *ARGS)
    assert done.returncode == 0, done.stderr
    return out


def test_schema_counts_and_carried_columns(rollouts, tiny_teacher):
    table = pq.read_table(rollouts)
    schema = table.schema
    assert schema.field("completion_token_ids").type == pa.list_(pa.int32())
    assert schema.field("prompt_token_ids").type == pa.list_(pa.int32())
    assert schema.field("completion_logprobs").type == pa.list_(pa.float32())
    assert schema.field("level").type == pa.int8()  # carried untouched
    assert table.num_rows == 3 * len(PROMPTS)
    rows = table.to_pylist()
    assert [r["sample_idx"] for r in rows[:3]] == [0, 1, 2]
    assert {r["finish_reason"] for r in rows} <= {"stop", "length"}
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    for r in rows:
        assert r["completion"] == tok.decode(r["completion_token_ids"], skip_special_tokens=True)
        assert r["prompt_token_ids"] == tok(r["prompt"])["input_ids"]
        assert all(lp <= 0 for lp in r["completion_logprobs"])
        assert len(r["completion_logprobs"]) == len(r["completion_token_ids"])
    record = provenance(rollouts)
    assert record["backend"] == "hf" and record["sampling"]["seed"] == 7 and len(record["model_hash"]) == 64
    assert len(record["tokenizer_hash"]) == 64


def test_logprobs_equal_a_teacher_forced_forward(rollouts, tiny_teacher):
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    for r in pq.read_table(rollouts).to_pylist():
        ids = r["prompt_token_ids"] + r["completion_token_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, len(r["prompt_token_ids"]) - 1 : -1]
        expected = torch.log_softmax(logits / 0.8, -1).gather(-1, torch.tensor(r["completion_token_ids"])[:, None])
        torch.testing.assert_close(torch.tensor(r["completion_logprobs"]), expected.squeeze(-1), atol=1e-4, rtol=0)


def test_seeded_runs_are_reproducible_and_seeds_matter(tmp_path, rollouts, tiny_teacher, prompts):
    again = tmp_path / "again.parquet"
    assert _cli("rollout", tiny_teacher, prompts, again, *ARGS).returncode == 0
    assert pq.read_table(again).equals(pq.read_table(rollouts))
    other = tmp_path / "other.parquet"
    assert _cli("rollout", tiny_teacher, prompts, other, *ARGS[:-4], "--seed", 8, "--batch-size", 2, "--device", "cpu").returncode == 0
    assert pq.read_table(other).column("completion_token_ids") != pq.read_table(rollouts).column("completion_token_ids")


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path, rollouts, tiny_teacher, prompts):
    out = tmp_path / "r.parquet"
    opts = RolloutOptions(
        sampling=SamplingOptions(n=3, temperature=0.8, top_k=50, max_new_tokens=12, seed=7),
        batch_size=2, device="cpu",
    )

    def interrupt(samples, tokens):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_rollout(tiny_teacher, prompts, out, opts, on_batch=interrupt)
    parts = tmp_path / "r.parquet.parts"
    assert (parts / "part-000000.parquet").exists() and not out.exists()
    refused = _cli("rollout", tiny_teacher, prompts, out, *ARGS)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    done = _cli("rollout", tiny_teacher, prompts, out, *ARGS, "--resume")
    assert done.returncode == 0, done.stderr
    assert '"samples_generated": 9' in done.stdout  # 2 of 3 batches were left
    assert pq.read_table(out).equals(pq.read_table(rollouts)) and not parts.exists()


def test_shards_merge_to_every_prompt_once(tmp_path, tiny_teacher, prompts):
    outs = []
    for i in range(2):
        out = tmp_path / f"r{i}.parquet"
        assert _cli("rollout", tiny_teacher, prompts, out, *ARGS, "--shard", f"{i}/2").returncode == 0
        outs.append(out)
    assert pq.read_table(outs[0]).column("prompt_id").to_pylist()[::3] == ["q0", "q2", "q4"]
    merged = tmp_path / "merged.parquet"
    done = _cli("merge", merged, *outs)
    assert done.returncode == 0, done.stderr
    keys = sorted(zip(*[pq.read_table(merged).column(c).to_pylist() for c in ("prompt_id", "sample_idx")]))
    assert keys == sorted((f"q{i}", s) for i in range(5) for s in range(3))
    # each file records the libraries of the process that wrote it; shards written under other ones still merge
    assert provenance(outs[0])["versions"]["torch"] == torch.__version__
    elsewhere = pq.read_table(outs[1])
    record = {**provenance(outs[1]), "versions": {"torch": "0.0.1"}}
    pq.write_table(elsewhere.replace_schema_metadata({b"fdivctl": json.dumps(record).encode()}), outs[1])
    done = _cli("merge", merged, *outs)
    assert done.returncode == 0, done.stderr
    assert provenance(merged)["versions"]["torch"] == torch.__version__
    overlap = _cli("merge", tmp_path / "bad.parquet", outs[0], outs[0])
    assert overlap.returncode == 2 and "overlap" in overlap.stderr
    # one shard of two is not the run (before: merged silently, half the prompts missing); --partial says so
    half = tmp_path / "half.parquet"
    refused = _cli("merge", half, outs[1])
    assert refused.returncode == 2 and "shard 0/2 of the run is not among the inputs" in refused.stderr
    assert not half.exists()
    partial = _cli("merge", half, outs[1], "--partial")
    assert partial.returncode == 0 and "warning: merged without shard 0/2" in partial.stderr
    assert provenance(half)["missing_shards"] == ["0/2"] and pq.read_table(half).num_rows == 6
    third = tmp_path / "third.parquet"
    assert _cli("rollout", tiny_teacher, prompts, third, *ARGS, "--shard", "0/3").returncode == 0
    mixed = _cli("merge", tmp_path / "mixed.parquet", third, outs[1])
    assert mixed.returncode == 2 and "were sharded differently" in mixed.stderr


def test_greedy_and_stop_strings(tmp_path, tiny_teacher, prompts):
    out = tmp_path / "g.parquet"
    assert _cli("rollout", tiny_teacher, prompts, out, "--temperature", 0, "--max-new-tokens", 6, "--device", "cpu").returncode == 0
    first = pq.read_table(out).to_pylist()[0]
    stop = first["completion"][2:4] if len(first["completion"]) >= 4 else first["completion"][:1]
    out2 = tmp_path / "s.parquet"
    assert _cli("rollout", tiny_teacher, prompts, out2, "--temperature", 0, "--max-new-tokens", 6, "--stop", stop,
                "--device", "cpu").returncode == 0
    row = pq.read_table(out2).to_pylist()[0]
    assert row["finish_reason"] == "stop" and stop in row["completion"]
    assert row["completion_token_ids"] == first["completion_token_ids"][: len(row["completion_token_ids"])]


@pytest.mark.parametrize(
    "table, message",
    [
        (pa.table({"prompt": ["x"]}), "needs columns prompt_id and prompt"),
        (pa.table({"prompt_id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}), "the table is empty"),
        (pa.table({"prompt_id": ["a"], "prompt": ["x"], "completion": ["y"]}), "would be overwritten"),
        (pa.table({"prompt_id": ["a", None], "prompt": ["x", "y"]}), "column 'prompt_id' is null in row 1"),
        (pa.table({"prompt_id": [7, 8, 7], "prompt": ["x", "y", "z"]}), "prompt_id '7' is in rows 0 and 2"),
        # met while sampling (the model is loaded by then): no interrupted run is left behind either
        (pa.table({"prompt_id": ["a", "b"], "prompt": ["x", None]}), "prompt_id 'b': the prompt is null"),
        (pa.table({"prompt_id": ["a"], "prompt": [5]}), "prompt_id 'a': the prompt is not text but int"),
        (pa.table({"prompt_id": ["a"], "messages": ["hello"]}), "its messages are text but not JSON (Expecting value: "
                                                                 "line 1 column 1 (char 0)): messages must be a list"),
        (pa.table({"prompt_id": ["a"], "messages": ["[]"]}), "messages must be a non-empty list of {role, content}"),
        (pa.table({"prompt_id": ["a"], "messages": [[{"role": "user"}]]}), "got [{'role': 'user'}]"),
    ],
)
def test_bad_prompts(tmp_path, tiny_teacher, table, message):
    path = tmp_path / "p.parquet"
    pq.write_table(table, path)
    done = _cli("rollout", tiny_teacher, path, tmp_path / "r.parquet", "--device", "cpu")
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "r.parquet").exists() and not (tmp_path / "r.parquet.parts").exists()


def test_bad_model_and_options(tmp_path, prompts, tiny_teacher):
    done = _cli("rollout", tmp_path, prompts, tmp_path / "r.parquet")
    assert done.returncode == 2 and "no config.json" in done.stderr
    bare = tmp_path / "no-tokenizer"  # transformers 5 would build an empty tokenizer: every prompt encodes to []
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tiny_teacher / name).read_bytes())
    done = _cli("rollout", bare, prompts, tmp_path / "r.parquet")
    assert done.returncode == 2 and "no tokenizer files (tokenizer.json" in done.stderr, done.stderr
    done = _cli("rollout", tiny_teacher, prompts, tmp_path / "r.parquet", "--top-p", 0)
    assert done.returncode == 2 and "--top-p" in done.stderr
    done = _cli("rollout", tiny_teacher, prompts, tmp_path / "r.parquet", "--backend", "tgi")
    assert done.returncode == 2 and "valid: auto, hf, vllm" in done.stderr
    done = _cli("rollout", tiny_teacher, prompts, tmp_path / "r.parquet", "--stop", "")
    assert done.returncode == 2 and "an empty stop string would end every completion" in done.stderr
    done = _cli("rollout", tiny_teacher, prompts, tmp_path / "r.parquet", "--tensor-parallel-size", 0)
    assert done.returncode == 2 and "--tensor-parallel-size must be ≥ 1" in done.stderr
    assert not (tmp_path / "r.parquet").exists()


def test_chat_template_for_messages_and_chat_flag(tmp_path, tiny_teacher):
    model_dir = tmp_path / "chat-model"
    import shutil

    shutil.copytree(tiny_teacher, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    tok.save_pretrained(model_dir)
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({
        "prompt_id": ["a", "b"],
        "prompt": ["Compute 1 + 2.", "Compute 3 * 4."],
        "messages": [[{"role": "user", "content": "Compute 5 + 5."}], None],
    }), path)
    out = tmp_path / "r.parquet"
    assert run_cli("rollout", model_dir, path, out, "--max-new-tokens", 4, "--device", "cpu").returncode == 0
    rows = pq.read_table(out).to_pylist()
    assert rows[0]["prompt"] == "[user] Compute 5 + 5.\n[assistant] "  # messages → template
    assert rows[1]["prompt"] == "Compute 3 * 4."  # no messages: the plain prompt
    assert rows[0]["prompt_token_ids"] == tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"]
    out2 = tmp_path / "r2.parquet"
    assert run_cli("rollout", model_dir, path, out2, "--max-new-tokens", 4, "--chat", "--device", "cpu").returncode == 0
    assert pq.read_table(out2).to_pylist()[1]["prompt"] == "[user] Compute 3 * 4.\n[assistant] "
    refused = run_cli("rollout", tiny_teacher, path, tmp_path / "r3.parquet", "--chat", "--device", "cpu")
    assert refused.returncode == 2 and "no chat template" in refused.stderr
