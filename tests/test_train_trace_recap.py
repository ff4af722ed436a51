"""TRACE (span-routed KL to a privileged teacher, GRPO elsewhere) and RECAP (replay with online objective weights):
the routing, the routed KL, the anneal and the weights by hand; then staged runs checked against direct
computations with the model."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from artifacts import STAGED, read_jsonl, staged_run, weights
from cli_runner import run_cli, run_torchrun
from fdivctl import divergences, engine
from fdivctl.errors import UserError
from fdivctl.io.checkpoints import load_causal_lm, load_tokenizer
from fdivctl.io.sequences import load_sequences
from fdivctl.objectives import trace
from fdivctl.schedules.replay_weights import RecapWeights

SPANS = pa.list_(pa.struct([("start", pa.int64()), ("end", pa.int64()), ("kind", pa.string())]))


def _span_table(spans):
    return pa.table({"spans": pa.array(spans, type=SPANS)})


def test_trace_routes_spans_by_outcome_and_kind():
    spans = trace.read_spans(_span_table([[{"start": 1, "end": 3, "kind": "key"}, {"start": 4, "end": 5,
                                                                                    "kind": "error"}],
                                          None, [{"start": 0, "end": 2, "kind": "error"}]]), "t", [5, 2, 3])
    correct = np.array([True, False, False])
    # row 0 is correct: its key span routes to forward KL, its error span stays on GRPO; row 2 is wrong: its error
    # span routes to reverse KL only when that channel is on
    torch.testing.assert_close(trace.token_routes(spans, [5, 2, 3], correct, error_channel=True),
                               torch.tensor([0, 1, 1, 0, 0, 0, 0, 2, 2, 0], dtype=torch.int8))
    torch.testing.assert_close(trace.token_routes(spans, [5, 2, 3], correct, error_channel=False),
                               torch.tensor([0, 1, 1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.int8))
    assert [trace.kl_anneal(t, 4) for t in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert trace.kl_anneal(100, None) == 1.0
    bad = {"kind 'hint'": [[{"start": 0, "end": 1, "kind": "hint"}]],
           "[2, 2) outside its 3": [[{"start": 2, "end": 2, "kind": "key"}]],
           "[1, 4) outside its 3": [[{"start": 1, "end": 4, "kind": "key"}]]}
    for message, rows in bad.items():
        with pytest.raises(UserError, match=message.replace("[", r"\[").replace(")", r"\)")):
            trace.read_spans(_span_table(rows), "t", [3])
    with pytest.raises(UserError, match="must be list<struct"):
        trace.read_spans(pa.table({"spans": pa.array([[1, 2]])}), "t", [3])


def test_routed_kl_is_forward_kl_on_key_tokens_and_reverse_kl_on_error_tokens():
    torch.manual_seed(0)
    hidden, weight = torch.randn(7, 16), torch.randn(40, 16)
    teacher = engine.TeacherHead(torch.randn(7, 16), torch.randn(40, 16))
    routes = torch.tensor([0, 1, 2, 1, 0, 2, 2], dtype=torch.int8)
    routed = engine.token_outputs(hidden, weight, target=teacher, divergence=trace.RoutedKL(routes),
                                  temperature=0.7, chunk_size=3).divergence
    per_route = {code: engine.token_outputs(hidden, weight, target=teacher, divergence=divergences.get(name),
                                            temperature=0.7).divergence for code, name in ((1, "fkl"), (2, "rkl"))}
    expected = torch.where(routes == 1, per_route[1], torch.where(routes == 2, per_route[2], torch.zeros(7)))
    torch.testing.assert_close(routed, expected)
    assert bool((routed[routes != 0] > 0).all())


def test_recap_weights_by_hand():
    recap = RecapWeights(2, window=4, temperature=0.5)
    for task, replay in [(2.0, 1.0), (1.8, 1.0), (1.6, 1.1), (1.4, 1.3)]:
        assert recap.weights() == [1.0, 1.0]  # uniform until both have a full window
        recap.update([task, replay])

    def score(h):
        mean = sum(h) / 4
        return (h[2] + h[3]) / (h[0] + h[1]) + math.sqrt(sum((x - mean) ** 2 for x in h) / 4) / mean

    s_task, s_replay = score([2.0, 1.8, 1.6, 1.4]), score([1.0, 1.0, 1.1, 1.3])
    w_replay = 2 * math.exp(s_replay / 0.5) / (math.exp(s_task / 0.5) + math.exp(s_replay / 0.5))
    # the task improves steadily, the replayed loss rises (forgetting): the replay gains weight
    assert recap.weights() == pytest.approx([2 - w_replay, w_replay]) and w_replay > 1
    recap.update([None, 1.5])  # a step without a task signal leaves the task's window as it was
    assert recap.history[0] == [2.0, 1.8, 1.6, 1.4] and recap.history[1] == [1.0, 1.1, 1.3, 1.5]
    restored = RecapWeights(2, window=4, temperature=0.5)
    restored.load_state_dict(recap.state_dict())
    assert restored.weights() == recap.weights()


# -- staged runs ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def annotated(scored_rollouts, tmp_path_factory):
    """The scored rollouts annotated for TRACE — spans.parquet: a key span over the first three tokens of every
    rollout, an error span over its last two, and a privileged prompt text that shows an example answer;
    plain.parquet: the same without the privileged prompt; none.parquet: no spans, the privileged prompt as token
    ids (the prompt said twice)."""
    table = pq.read_table(scored_rollouts)
    lengths = [len(c) for c in table.column("completion_token_ids").to_pylist()]
    spans = pa.array([[{"start": 0, "end": min(3, n), "kind": "key"},
                       {"start": max(0, n - 2), "end": n, "kind": "error"}] if n else [] for n in lengths], type=SPANS)
    hint = [f"example answer {a}. {p}" for a, p in zip(table.column("answer").to_pylist(),
                                                         table.column("prompt").to_pylist())]
    twice = pa.array([p + p for p in table.column("prompt_token_ids").to_pylist()], type=pa.list_(pa.int64()))
    root = tmp_path_factory.mktemp("trace")
    plain = table.append_column("spans", spans)
    variants = {"spans": plain.append_column("privileged_prompt", pa.array(hint)), "plain": plain,
                "none": table.append_column("spans", pa.array([None] * table.num_rows, type=SPANS))
                .append_column("privileged_prompt_token_ids", twice)}
    for name, t in variants.items():
        pq.write_table(t.replace_schema_metadata(table.schema.metadata), root / f"{name}.parquet")
    return root


def test_trace_without_spans_is_grpo(task, scored_rollouts, annotated, tmp_path):
    staged_run(task, scored_rollouts, tmp_path / "grpo")
    staged_run(task, annotated / "none.parquet", tmp_path / "trace", "--algo", "trace")
    for name, value in weights(tmp_path / "grpo").items():
        assert torch.equal(value, weights(tmp_path / "trace")[name]), name


@torch.no_grad()
def _privileged_self_kl(model_dir, table):
    """Mean KL(π(·|privileged prompt, y_<t) ‖ π(·|prompt, y_<t)) over the key-span tokens of correct rollouts."""
    model, tokenizer = load_causal_lm(model_dir, device="cpu"), load_tokenizer(model_dir)
    total, count = 0.0, 0
    for row in table.to_pylist():
        n = len(row["completion_token_ids"])
        if not row["correct"] or not n:
            continue
        key = min(3, n)
        logp = []
        for prompt in (tokenizer(row["privileged_prompt"])["input_ids"], row["prompt_token_ids"]):
            ids = torch.tensor([prompt + row["completion_token_ids"]])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + key]
            logp.append(torch.log_softmax(logits.double(), -1))
        teacher, student = logp
        total += float((teacher.exp() * (teacher - student)).sum())
        count += key
    return total / count


def test_trace_key_kl_is_the_policys_own_kl_under_privileged_context(task, annotated, tmp_path):
    table = pq.read_table(annotated / "spans.parquet")
    lines = staged_run(task, annotated / "spans.parquet", tmp_path / "trace", "--algo", "trace", "--ppo-epochs", 3,
                       "--kl-warmup", 2, "--error-kl-coef", 0.5)
    correct = np.asarray(table.column("correct").to_pylist())
    lengths = np.asarray([len(c) for c in table.column("completion_token_ids").to_pylist()])
    assert lines[0]["key_tokens"] == float(np.minimum(3, lengths[correct]).sum()) > 0
    assert lines[0]["error_tokens"] == float(np.minimum(2, lengths[~correct]).sum()) > 0
    assert lines[0]["key_kl"] == pytest.approx(_privileged_self_kl(task / "sft", table), rel=1e-4)
    assert lines[0]["error_kl"] > 0
    # the KL channel fades over 2 steps; at step 3 it is closed (no teacher pass, nothing logged for it)
    assert [line["kl_anneal"] for line in lines] == [1.0, 0.5, 0.0]
    assert lines[2]["key_kl"] == 0.0 and lines[1]["key_kl"] > 0


def test_trace_with_a_teacher_model_or_its_store(task, annotated, tmp_path):
    (by_model,) = staged_run(task, annotated / "plain.parquet", tmp_path / "model", "--algo", "trace", "--teacher",
                             task / "random", "--error-kl-coef", 0.1)
    # the random model is far from the SFT policy: the key-span KL is large
    assert by_model["key_kl"] > 1.0 and by_model["error_kl"] > 0 and np.isfinite(by_model["loss"])
    # a store of the same teacher with k = V (an empty tail) in fp32 gives the same KL
    store = tmp_path / "store"
    run_cli("teacher-logits", task / "random", annotated / "plain.parquet", store, "--k", 320, "--dtype", "fp32",
            "--device", "cpu", check=True)
    (by_store,) = staged_run(task, annotated / "plain.parquet", tmp_path / "store_run", "--algo", "trace",
                             "--teacher-logits", store, "--error-kl-coef", 0.1)
    for key in ("key_kl", "error_kl", "loss"):
        assert by_store[key] == pytest.approx(by_model[key], rel=1e-4), key


def test_trace_with_recap_replay_on_two_processes_equals_one(task, annotated, general, tmp_path):
    """The self-teacher's forward and the replayed objective under FSDP: 2 gloo processes give one's update."""
    args = ["--algo", "trace", "--error-kl-coef", 0.3, "--replay", general, "--replay-weighting", "recap",
            "--recap-window", 2, "--minibatch-size", 7, "--micro-batch-size", 2, "--ppo-epochs", 1]
    lines = staged_run(task, annotated / "spans.parquet", tmp_path / "single", *args)
    log = tmp_path / "sharded.jsonl"
    done = run_torchrun("train", task / "sft", tmp_path / "sharded", "--rollouts", annotated / "spans.parquet",
                        *STAGED, *args, "--log-jsonl", log)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = read_jsonl(log)
    assert len(lines) == len(sharded) == 15 and lines[5]["weight_task"] != 1.0
    for x, y in zip(lines, sharded):
        for key in ("loss", "key_kl", "error_kl", "weight_task", "replay_loss_0", "task_signal"):
            assert y.get(key) == pytest.approx(x.get(key), rel=1e-3, abs=1e-5), key
    a, b = weights(tmp_path / "single"), weights(tmp_path / "sharded")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=0)


def test_trace_bad_input(task, scored_rollouts, annotated, tmp_path):
    cases = {
        "needs a spans column": (scored_rollouts, []),
        "--algo trace needs a teacher: --teacher MODEL": (annotated / "plain.parquet", []),
        "--kl-warmup must be ≥ 1": (annotated / "spans.parquet", ["--kl-warmup", 0]),
        "--key-kl-coef and --error-kl-coef must be ≥ 0": (annotated / "spans.parquet", ["--error-kl-coef", -1]),
    }
    for message, (rollouts, args) in cases.items():
        done = run_cli("train", task / "sft", tmp_path / "o", "--rollouts", rollouts, "--algo", "trace", *args,
                       "--device", "cpu")
        assert done.returncode == 2 and message in done.stderr, (message, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "o" / "model.safetensors").exists()
    done = run_cli("train", task / "sft", tmp_path / "o", "--prompts", task / "data" / "prompts.parquet", "--algo",
                   "trace", "--device", "cpu")
    assert done.returncode == 2 and "train staged with --rollouts" in done.stderr


@torch.no_grad()
def _mean_nll(model_dir, data_path) -> float:
    model = load_causal_lm(model_dir, device="cpu")
    seqs = load_sequences(data_path, load_tokenizer(model_dir))
    batch = seqs.batch(list(range(len(seqs))), pad_id=0)
    logits = model(input_ids=batch["input_ids"]).logits  # right-padded: no mask needed at the read positions
    logp = torch.log_softmax(logits[batch["batch_index"], batch["position"]].double(), -1)
    return float(-logp.gather(-1, batch["token"][:, None]).mean())


@pytest.fixture(scope="module")
def general(task, tmp_path_factory):
    """A small "general-domain" replay table: 12 SFT rows of the demo task."""
    path = tmp_path_factory.mktemp("replay") / "general.parquet"
    pq.write_table(pq.read_table(task / "data" / "sft.parquet").slice(0, 12), path)
    return path


def test_replay_adds_the_general_cross_entropy(task, scored_rollouts, general, tmp_path):
    first = staged_run(task, scored_rollouts, tmp_path / "replay", "--replay", general, "--replay-batch-size", 16)[0]
    assert first["replay_loss_0"] == pytest.approx(_mean_nll(task / "sft", general), rel=1e-4)
    assert first["weight_task"] == first["weight_replay_0"] == 1.0
    staged_run(task, scored_rollouts, tmp_path / "plain")
    assert any(not torch.equal(v, weights(tmp_path / "plain")[k]) for k, v in weights(tmp_path / "replay").items())


def test_recap_weights_follow_the_logged_signals(task, scored_rollouts, general, tmp_path):
    lines = staged_run(task, scored_rollouts, tmp_path / "recap", "--replay", general, "--replay-weighting",
                       "recap", "--recap-window", 2, "--ppo-epochs", 5, "--lr", "5e-3", "--replay-objective", "rkl",
                       "--replay-coef", 5)
    replayed = RecapWeights(2, window=2)
    for line in lines:
        assert [line["weight_task"], line["weight_replay_0"]] == pytest.approx(replayed.weights())
        replayed.update([line["task_signal"], line["replay_loss_0"]])
    assert [line["weight_task"] for line in lines[:2]] == [1.0, 1.0] and lines[2]["weight_task"] != 1.0
    assert lines[0]["replay_loss_0"] == pytest.approx(0.0, abs=1e-5)  # the policy is its own reference at first


def test_online_recap_resumes_with_its_signal_history(task, general, tmp_path):
    args = ["--prompts", task / "data" / "prompts.parquet", "--verifier", "regex", "--pattern", r"^\s*[1-3]\+",
            "--max-new-tokens", 10, "--group-size", 4, "--prompts-per-iteration", 4, "--lr", "5e-3", "--device",
            "cpu", "--replay", general, "--replay-weighting", "recap", "--recap-window", 2]
    whole, part = tmp_path / "whole", tmp_path / "part"
    run_cli("train", task / "sft", whole, *args, "--iterations", 3, "--log-jsonl", tmp_path / "whole.jsonl",
            check=True)
    lines = read_jsonl(tmp_path / "whole.jsonl")
    assert lines[2]["weight_task"] != 1.0 and lines[2]["weight_task"] + lines[2]["weight_replay_0"] == \
        pytest.approx(2.0)
    # interrupted after iteration 1: the resumed run must weigh iteration 3 from the restored history
    run_cli("train", task / "sft", part, *args, "--iterations", 1, check=True)
    run_cli("train", task / "sft", part, *args, "--iterations", 3, "--resume", check=True)
    a, b = weights(whole), weights(part)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_replay_bad_input(task, scored_rollouts, general, tmp_path):
    no_text = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"prompt_id": ["a"], "body": ["hello"]}), no_text)
    empty = tmp_path / "empty.parquet"
    pq.write_table(pq.read_table(general).slice(0, 0), empty)
    cases = {
        "--replay-weighting recap weighs replayed objectives": ["--replay-weighting", "recap"],
        "--replay-weighting 'x'; valid: fixed, recap": ["--replay-weighting", "x"],
        "needs prompt_token_ids + completion_token_ids": ["--replay", no_text],
        "empty.parquet: the table is empty": ["--replay", empty],
        "--recap-window must be ≥ 2": ["--replay", general, "--recap-window", 1],
        "give --ref-model": ["--replay", general, "--replay-objective", "rkl", "--ref-logits", tmp_path],
        "--replay-objective: sft or a divergence": ["--replay", general, "--replay-objective", "xx"],
    }
    for message, args in cases.items():
        done = run_cli("train", task / "sft", tmp_path / "o", "--rollouts", scored_rollouts, *args, "--device", "cpu")
        assert done.returncode == 2 and message in done.stderr, (message, done.stderr)
        assert not (tmp_path / "o" / "model.safetensors").exists()


def test_a_trace_teacher_store_is_checked_against_the_privileged_prompts(task, annotated, tmp_path):
    """With privileged prompts, TRACE's teacher is given them: a store made after them is accepted, one made after
    the rollouts' plain prompts is refused before any step (unless --allow-prompt-mismatch)."""
    rollouts = pq.read_table(annotated / "spans.parquet")
    tokenizer = load_tokenizer(task / "random")
    privileged = rollouts.select(["prompt_id", "sample_idx", "completion_token_ids"]).append_column(
        "prompt_token_ids", pa.array([tokenizer(t)["input_ids"] for t in rollouts.column("privileged_prompt")
                                      .to_pylist()], pa.list_(pa.int32())))
    pq.write_table(privileged, tmp_path / "privileged.parquet")
    stores = {}
    for name, source in (("privileged", tmp_path / "privileged.parquet"), ("plain", annotated / "plain.parquet")):
        stores[name] = tmp_path / f"{name}-store"
        run_cli("teacher-logits", task / "random", source, stores[name], "--k", 8, "--device", "cpu", check=True)
    args = ["--algo", "trace", "--error-kl-coef", 0.1, "--max-steps", 1]
    staged_run(task, annotated / "spans.parquet", tmp_path / "ok", *args, "--teacher-logits", stores["privileged"])
    done = run_cli("train", task / "sft", tmp_path / "bad", "--rollouts", annotated / "spans.parquet", *STAGED, *args,
                   "--teacher-logits", stores["plain"])
    assert done.returncode == 2 and "the teacher was given other prompt tokens" in done.stderr, done.stderr
