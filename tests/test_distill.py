"""distill on tiny random Qwen2 models: every loss descends, offline == online at k = V, exact resume."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cli_runner import run_cli
from conftest import write_sequences
from safetensors.torch import load_file
from transformers import AutoTokenizer

from fdivctl import divergences, tiny
from fdivctl.stages.distill import DistillOptions, prepare_distill, run_distill
from fdivctl.training.loop import LoopOptions


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_teacher):
    vocab = len(AutoTokenizer.from_pretrained(tiny_teacher))
    return write_sequences(tmp_path_factory.mktemp("data") / "seqs.parquet", vocab, 8, 5, 7, seed=3)


@pytest.fixture(scope="module")
def full_store(tmp_path_factory, tiny_teacher, data):
    out = tmp_path_factory.mktemp("store") / "logits"
    done = run_cli("teacher-logits", tiny_teacher, data, out, "--k", 320, "--dtype", "fp32", "--device", "cpu",
                   "--temperature", 2.0)
    assert done.returncode == 0, done.stderr
    return out


def _steps(log):
    return [json.loads(line) for line in log.read_text().splitlines()]


def _opts(tmp_path, loss, steps=2, **loop):
    defaults = dict(lr=3e-3, lr_schedule="constant", batch_size=8, max_steps=steps, log_jsonl=tmp_path / "log.jsonl")
    return DistillOptions(loss=loss, device="cpu", loop=LoopOptions(**{**defaults, **loop}))


@pytest.mark.parametrize(
    "loss", ["fkl", "rkl", "jsd", "jsd:beta=0.1", "tv", "hellinger", "alpha:alpha=0.2", "skl", "srkl", "ce", "pld",
             "sinkhorn:eps=0.05,batch=16", "bdkd"]
)
def test_one_step_lowers_each_loss(tmp_path, student, data, tiny_teacher, loss):
    teacher = None if loss == "ce" else tiny_teacher
    run_distill(student, tmp_path / "ckpt", data, _opts(tmp_path, loss), teacher=teacher)
    first, second = _steps(tmp_path / "log.jsonl")  # the whole data set is one batch: the same loss, twice
    assert second["loss"] < first["loss"]
    assert (tmp_path / "ckpt" / "config.json").exists() and (tmp_path / "ckpt" / "fdivctl_state").exists()


@pytest.mark.parametrize("loss", ["jsd", "ce"])
def test_gradient_accumulation_is_one_micro_batch_of_the_same_rows(tmp_path, student, tiny_teacher, loss):
    """A step's loss is the mean over all its tokens: 4 rows as 1 × 4, 2 × 2 or 4 × 1 (micro-batch × accumulation)
    give the same loss and gradient on completions of 2 to 17 tokens.  Before, a step averaged its micro-batches'
    means, so a token of a 2-token completion weighed 8.5× one of a 17-token completion at --batch-size 1."""
    vocab = len(AutoTokenizer.from_pretrained(tiny_teacher))
    g = torch.Generator().manual_seed(11)
    lengths = [2, 5, 9, 17]
    ids = pa.list_(pa.int32())
    path = tmp_path / "varied.parquet"
    pq.write_table(pa.table({
        "prompt_id": [f"p{i}" for i in range(4)], "sample_idx": [0] * 4,
        "prompt_token_ids": pa.array(torch.randint(3, vocab, (4, 3), generator=g).tolist(), ids),
        "completion_token_ids": pa.array([torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths], ids),
    }), path)
    logs = []
    for batch_size, grad_accum in ((4, 1), (2, 2), (1, 4)):
        log = tmp_path / f"{batch_size}x{grad_accum}.jsonl"
        opts = _opts(tmp_path, loss, steps=1, batch_size=batch_size, grad_accum=grad_accum, log_jsonl=log)
        run_distill(student, tmp_path / f"{batch_size}x{grad_accum}", path, opts,
                    teacher=None if loss == "ce" else tiny_teacher)
        logs.append(_steps(log)[0])
    for other in logs[1:]:
        assert other["tokens"] == logs[0]["tokens"] == sum(lengths)
        for key in ("loss", loss, "grad_norm"):
            assert other[key] == pytest.approx(logs[0][key], rel=1e-5), key


@pytest.mark.parametrize("name", ["jsd", "pld", "bdkd"])
def test_offline_full_k_store_equals_the_online_teacher(tmp_path, student, data, tiny_teacher, full_store, name):
    results = []
    for kwargs in ({"logits": full_store}, {"teacher": tiny_teacher}):
        opts = _opts(tmp_path, name, steps=1)
        opts.temperature = 2.0  # the store was made at T = 2
        model, _, n, loss_fn = prepare_distill(student, data, opts, **kwargs)
        loss, _ = loss_fn(list(range(n)))
        grads = torch.autograd.grad(loss, [p for p in model.parameters()])
        results.append((loss.detach(), grads))
    (loss_off, grads_off), (loss_on, grads_on) = results
    torch.testing.assert_close(loss_off, loss_on, rtol=1e-6, atol=1e-7)
    # PLD ranks by the teacher's log-probs: fp32 near-ties may order differently in the store and online
    atol = 5e-6 if name == "pld" else 1e-7
    for g_off, g_on in zip(grads_off, grads_on):
        torch.testing.assert_close(g_off, g_on, rtol=1e-4, atol=atol)


def _to_whole_optimizer_state(checkpoint):
    """Rewrite a checkpoint as fdivctl wrote it before the sharded optimizer state: the whole optimizer state,
    keyed by parameter name, inside ``state.pt``."""
    import shutil

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    state_dir = checkpoint / "fdivctl_state"
    dcp_to_torch_save(state_dir / "optimizer", state_dir / "optimizer.pt")
    whole = torch.load(state_dir / "optimizer.pt", weights_only=False)["optimizer"]
    assert whole["state"] and all(isinstance(name, str) for name in whole["state"])
    state = torch.load(state_dir / "state.pt", weights_only=False)
    torch.save({**state, "optimizer": whole}, state_dir / "state.pt")
    shutil.rmtree(state_dir / "optimizer")
    (state_dir / "optimizer.pt").unlink()


@pytest.mark.parametrize("optimizer_format", ["sharded", "whole"])
def test_resume_equals_an_uninterrupted_run(tmp_path, student, data, tiny_teacher, full_store, optimizer_format):
    common = dict(batch_size=4, lr_schedule="cosine", warmup=1, save_every=2)
    straight = tmp_path / "straight"
    run_distill(student, straight, data, _opts(tmp_path, "fkl", steps=5, **common), logits=full_store)

    resumed = tmp_path / "resumed"

    def stop_after_two(step, total, figures):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_distill(student, resumed, data, _opts(tmp_path, "fkl", steps=5, **common), logits=full_store,
                    on_step=stop_after_two)
    refused = run_cli("distill", student, resumed, "--data", data, "--logits", full_store, "--device", "cpu")
    assert refused.returncode == 2 and "--resume" in refused.stderr
    if optimizer_format == "whole":
        _to_whole_optimizer_state(resumed)
    run_distill(student, resumed, data, _opts(tmp_path, "fkl", steps=5, resume=True, **common), logits=full_store)
    wa, wb = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=0)


def test_an_option_newer_than_the_checkpoint_resumes_at_its_default_only():
    """A checkpoint written before an option existed lacks its key: the run resumes with the option at its default
    (which keeps the earlier behaviour), and is refused with it set (was: refused either way, so upgrading fdivctl
    stopped every run in progress)."""
    from pathlib import Path

    from fdivctl.errors import UserError
    from fdivctl.training.run_settings import check_same_run

    saved = {"loss": "jsd", "loop.lr": 1e-4}
    check_same_run(Path("run"), saved, {**saved, "loop.group_by_length": False, "max_length": None})
    with pytest.raises(UserError, match=r"loop.group_by_length: None → True"):
        check_same_run(Path("run"), saved, {**saved, "loop.group_by_length": True})
    check_same_run(Path("run"), {**saved, "retired_option": None}, saved)  # an option since removed, at its default
    with pytest.raises(UserError, match="loss: 'jsd' → 'fkl'"):
        check_same_run(Path("run"), saved, {**saved, "loss": "fkl", "loop.group_by_length": False})


def test_resume_refuses_other_settings_and_accepts_moved_inputs(tmp_path, student, data, full_store):
    """A checkpoint records its run's settings (inputs by content): --resume with another loss, batch size or data
    is refused, naming what differs; the same data at another path, a longer run and another log are not."""
    import shutil

    out = tmp_path / "run"
    common = ["--logits", full_store, "--device", "cpu", "--batch-size", 4]
    run_cli("distill", student, out, "--data", data, *common, "--loss", "jsd", "--max-steps", 2, check=True)
    other_data = tmp_path / "other.parquet"
    pq.write_table(pq.read_table(data).slice(1), other_data)
    for extra, message in ((["--data", data, "--loss", "fkl"], "loss: 'jsd' → 'fkl'"),
                           (["--data", data, "--loss", "jsd", "--lr", "0.5"], "loop.lr: 0.0001 → 0.5"),
                           (["--data", other_data, "--loss", "jsd"], "data: file ")):
        done = run_cli("distill", student, out, *extra, *common, "--max-steps", 3, "--resume")
        assert done.returncode == 2 and f"--resume: {out} was started with other settings ({message}" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    moved = tmp_path / "moved" / "data.parquet"
    moved.parent.mkdir()
    shutil.copy(data, moved)
    done = run_cli("distill", student, out, "--data", moved, *common, "--loss", "jsd", "--max-steps", 3, "--resume",
                   "--log-jsonl", tmp_path / "more.jsonl")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["steps"] == 3


def test_cli_distill_offline_and_log(tmp_path, student, data, full_store):
    log = tmp_path / "log.jsonl"
    done = run_cli("distill", student, tmp_path / "out", "--data", data, "--logits", full_store, "--beta", 0.3,
                   "--temperature", 2.0, "--max-steps", 2, "--batch-size", 4, "--log-jsonl", log, "--mix-ce", 0.1,
                   "--device", "cpu")
    assert done.returncode == 0, done.stderr
    lines = _steps(log)
    assert len(lines) == 2 and {"loss", "jsd", "ce", "grad_norm", "lr", "tokens_per_s"} <= set(lines[0])
    assert json.loads(done.stdout.splitlines()[-1])["steps"] == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--loss", "kld"], "unknown divergence 'kld'"),
        (["--loss", "fkl"], "give exactly one teacher signal"),
        (["--loss", "ce", "--teacher", "TEACHER"], "--loss ce uses no teacher"),
        (["--loss", "fkl", "--logits", "STORE", "--teacher", "TEACHER"], "give exactly one teacher signal"),
        (["--loss", "fkl", "--logits", "STORE", "--lr-schedule", "wavy"], "--lr-schedule 'wavy'"),
        (["--loss", "fkl", "--logits", "STORE", "--trust-region", "0"], "--trust-region ε must be > 0, got 0.0"),
        (["--loss", "fkl", "--logits", "STORE", "--mix-ce", "-1"], "--mix-ce is a weight of the cross-entropy"),
        (["--loss", "fkl", "--logits", "STORE", "--max-steps", "0"], "--max-steps must be ≥ 1"),
        (["--loss", "ce", "--trust-region", "0.1"], "not --loss ce"),
    ],
)
def test_bad_distill_input(tmp_path, student, data, tiny_teacher, full_store, extra, message):
    extra = [str(tiny_teacher) if e == "TEACHER" else str(full_store) if e == "STORE" else e for e in extra]
    done = run_cli("distill", student, tmp_path / "out", "--data", data, "--device", "cpu", *extra)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_store_for_other_sequences_is_refused(tmp_path, student, data, full_store):
    table = pq.read_table(data).to_pylist()
    table[0]["completion_token_ids"] = list(reversed(table[0]["completion_token_ids"]))
    other = tmp_path / "other.parquet"
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(data)), other)
    done = run_cli("distill", student, tmp_path / "out", "--data", other, "--logits", full_store, "--device", "cpu")
    assert done.returncode == 2 and "made for other sequences" in done.stderr


def test_divergence_schedule_parses_and_switches(tmp_path, student, data, full_store):
    from fdivctl.schedules.divergence_schedule import DivergenceSchedule

    schedule = DivergenceSchedule.parse("fkl:0.5,jsd:beta=0.3:0.25,rkl:0.25")
    assert [schedule.at(s, 8).name for s in range(8)] == ["fkl"] * 4 + ["jsd"] * 2 + ["rkl"] * 2
    assert schedule.at(5, 8).params == {"beta": 0.3}
    for bad, message in (("fkl:0.5,rkl:0.4", "sum to 0.9"), ("fkl", "SPEC:FRACTION"), ("fkl:x", "not a number")):
        with pytest.raises(ValueError, match=message):
            DivergenceSchedule.parse(bad)
    log = tmp_path / "log.jsonl"
    done = run_cli("distill", student, tmp_path / "out", "--data", data, "--logits", full_store, "--temperature", 2,
                   "--schedule", "fkl:0.5,rkl:0.5", "--max-steps", 4, "--batch-size", 4, "--log-jsonl", log,
                   "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert [("fkl" in line, "rkl" in line) for line in _steps(log)] == [(True, False)] * 2 + [(False, True)] * 2
    bad = run_cli("distill", student, tmp_path / "out2", "--data", data, "--logits", full_store,
                  "--schedule", "fkl:0.5,rkl:0.6", "--device", "cpu")
    assert bad.returncode == 2 and "--schedule: schedule fractions sum to 1.1, not 1" in bad.stderr


def test_nan_loss_stops_without_a_corrupted_checkpoint(tmp_path, student, data, full_store):
    import shutil

    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    shutil.copytree(student, broken)
    weights = load_file(broken / "model.safetensors")
    name = next(n for n in weights if "mlp" in n)
    weights[name][0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    done = run_cli("distill", broken, tmp_path / "out", "--data", data, "--logits", full_store, "--device", "cpu")
    assert done.returncode == 2
    assert "non-finite loss at step 1: stopped; no checkpoint was written yet" in done.stderr
    assert not (tmp_path / "out").exists()


def _text_split(path, lines):
    prompts, completions = zip(*(line.split(". The") for line in lines))
    pq.write_table(pa.table({"prompt": [p + "." for p in prompts], "completion": [" The" + c for c in completions]}), path)
    return path


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory, tokenizer_dir):
    """A tiny teacher trained with `distill --loss ce` on the synthetic arithmetic task."""
    root = tmp_path_factory.mktemp("trained")
    tiny.make_model(root / "init", AutoTokenizer.from_pretrained(tokenizer_dir), seed=11)
    train = _text_split(root / "train.parquet", tiny.corpus(256, seed=21))
    done = run_cli("distill", root / "init", root / "teacher", "--data", train, "--loss", "ce", "--lr", 3e-3,
                   "--batch-size", 32, "--max-steps", 200, "--lr-schedule", "cosine", "--warmup", 10, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    return root / "teacher"


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd"])
def test_distillation_moves_the_student_toward_the_teacher(tmp_path, tokenizer_dir, trained_teacher, loss):
    tiny.make_model(tmp_path / "student", AutoTokenizer.from_pretrained(tokenizer_dir), seed=12, layers=1)
    train = _text_split(tmp_path / "train.parquet", tiny.corpus(128, seed=31))
    held_out = _text_split(tmp_path / "held_out.parquet", tiny.corpus(64, seed=41))

    def held_out_divergence(model_dir):
        _, _, n, loss_fn = prepare_distill(model_dir, held_out, _opts(tmp_path, loss), teacher=trained_teacher)
        with torch.no_grad():
            return loss_fn(list(range(n)))[0].item()

    before = held_out_divergence(tmp_path / "student")
    done = run_cli("distill", tmp_path / "student", tmp_path / "out", "--data", train, "--teacher", trained_teacher,
                   "--loss", loss, "--lr", 3e-3, "--batch-size", 32, "--max-steps", 100, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    after = held_out_divergence(tmp_path / "out")
    print(f"held-out {loss}: {before:.4f} -> {after:.4f} ({after / before:.1%})")
    assert after <= 0.5 * before, (before, after)


def test_several_teachers_mix_per_token(tmp_path, student, data, tiny_teacher, tokenizer_dir):
    second = tmp_path / "second"
    tiny.make_model(second, AutoTokenizer.from_pretrained(tokenizer_dir), seed=9)
    for weights in ("confidence", "0.7,0.3"):
        log = tmp_path / f"{weights}.jsonl"
        done = run_cli("distill", student, tmp_path / f"out-{weights}", "--data", data, "--teacher", tiny_teacher,
                       "--teacher", second, "--teacher-weights", weights, "--max-steps", 1, "--log-jsonl", log,
                       "--device", "cpu")
        assert done.returncode == 0, done.stderr
    assert _steps(tmp_path / "confidence.jsonl")[0]["fkl"] != _steps(tmp_path / "0.7,0.3.jsonl")[0]["fkl"]
    bad = run_cli("distill", student, tmp_path / "bad", "--data", data, "--teacher", tiny_teacher, "--teacher",
                  second, "--teacher-weights", "1", "--device", "cpu")
    assert bad.returncode == 2 and "need 2 finite non-negative weights" in bad.stderr
    bad = run_cli("distill", student, tmp_path / "bad", "--data", data, "--teacher", tiny_teacher, "--teacher",
                  second, "--teacher-weights", "inf,1", "--device", "cpu")
    assert bad.returncode == 2 and "need 2 finite non-negative weights" in bad.stderr


def test_empty_prompt_is_refused_by_distill_and_teacher_logits(tmp_path, student, data, tiny_teacher):
    rows = pq.read_table(data).to_pylist()
    rows[2]["prompt_token_ids"] = []
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(data)), bad)
    done = run_cli("distill", student, tmp_path / "out", "--data", bad, "--teacher", tiny_teacher, "--device", "cpu")
    assert done.returncode == 2 and "prompt_id 'p2') has an empty prompt" in done.stderr
    done = run_cli("teacher-logits", tiny_teacher, bad, tmp_path / "store", "--device", "cpu")
    assert done.returncode == 2 and "has an empty prompt" in done.stderr
    assert not (tmp_path / "store").exists()


def test_no_completion_token_is_refused_and_an_empty_batch_has_zero_loss(tmp_path, student, data, tiny_teacher):
    """A table whose every completion is empty is refused before any training (distill, train --algo sft); a
    batch of empty completions in a table with tokens elsewhere gives loss 0, not NaN (cross-entropy included)."""
    from fdivctl.objectives.kd import KDBatch, kd_loss

    rows = pq.read_table(data).to_pylist()
    for row in rows:
        row["completion_token_ids"] = []
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(data)), empty)
    for command in (["distill", student, tmp_path / "out", "--data", empty, "--teacher", tiny_teacher],
                    ["train", student, tmp_path / "out", "--algo", "sft", "--data", empty]):
        done = run_cli(*command, "--device", "cpu")
        assert done.returncode == 2 and "no token to score: every completion is empty" in done.stderr, done.stderr
        assert not (tmp_path / "out").exists()
    hidden, weight = torch.zeros(0, 8, requires_grad=True), torch.randn(16, 8)
    loss, figures = kd_loss(KDBatch(hidden, torch.zeros(0, dtype=torch.long), None), weight, None, None)
    loss.backward()
    assert loss.item() == 0.0 and figures["ce"] == 0.0 and figures["tokens"] == 0.0


def test_chunk_size_changes_memory_not_the_update(tmp_path, student, data, tiny_teacher):
    """distill --chunk-size 3: the student head's pass (jsd to an online teacher, plus cross-entropy) in 3-token
    chunks gives the one-chunk run's losses and weights up to fp32 summation order."""
    common = ["--data", data, "--teacher", tiny_teacher, "--loss", "jsd", "--mix-ce", 0.5, "--max-steps", 2,
              "--lr", "1e-3", "--batch-size", 4, "--device", "cpu"]
    for name, extra in (("default", []), ("chunked", ["--chunk-size", 3])):
        run_cli("distill", student, tmp_path / name, *common, *extra, "--log-jsonl", tmp_path / f"{name}.jsonl",
                check=True)
    logs = [[json.loads(line) for line in (tmp_path / f"{n}.jsonl").read_text().splitlines()]
            for n in ("default", "chunked")]
    for key in ("jsd", "ce", "grad_norm"):
        assert [r[key] for r in logs[1]] == pytest.approx([r[key] for r in logs[0]], rel=1e-5), key
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("default", "chunked"))
    apart = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert 0 < apart < 1e-5, apart  # 0 would mean no chunking happened
    done = run_cli("distill", student, tmp_path / "bad", *common, "--chunk-size", 0)
    assert done.returncode == 2 and "--chunk-size must be ≥ 1, got 0" in done.stderr


def test_max_grad_norm_zero_is_no_clipping_and_a_negative_one_is_refused(tmp_path, student, data):
    """Clipping at a negative norm would flip the gradient (clip_grad_norm_ scales by max_norm / ‖g‖)."""
    common = ["--data", data, "--loss", "ce", "--max-steps", 2, "--lr", "1e-2", "--device", "cpu"]
    for name, norm in (("off", 0), ("huge", 1e9), ("tight", 1e-3)):
        run_cli("distill", student, tmp_path / name, *common, "--max-grad-norm", norm,
                "--log-jsonl", tmp_path / f"{name}.jsonl", check=True)
    off, huge, tight = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("off", "huge", "tight"))
    assert all(torch.equal(off[k], huge[k]) for k in off)
    assert any(not torch.allclose(off[k], tight[k]) for k in off)
    assert json.loads((tmp_path / "off.jsonl").read_text().splitlines()[0])["grad_norm"] > 1e-3
    done = run_cli("distill", student, tmp_path / "neg", *common, "--max-grad-norm", -1)
    assert done.returncode == 2 and "--max-grad-norm must be ≥ 0 (0: no clipping), got -1.0" in done.stderr
    assert not (tmp_path / "neg").exists()


def test_token_id_columns_read_row_by_row_across_chunks_slices_and_nulls(tmp_path, data):
    """list<int> columns (io.sequences.int_list_column) read from the flat Arrow values: several record batches, a
    sliced table, large_list; a null row (a missing completion, not an empty one) or a null id inside a row is
    one clear error."""
    from fdivctl.errors import UserError
    from fdivctl.io.sequences import int_list_column

    kinds = (pa.list_(pa.int32()), pa.large_list(pa.int64()))
    for kind in kinds:
        chunks = [pa.array([[1, 2], [3], []], kind), pa.array([[5], [7, 8, 9]], kind)]
        table = pa.table({"c": pa.chunked_array(chunks)}).slice(1)
        got = int_list_column(table, "c", tmp_path)
        assert [row.tolist() for row in got] == [[3], [], [5], [7, 8, 9]] and all(r.dtype == "int64" for r in got)
    assert int_list_column(pa.table({"c": pa.array([], kinds[0])}), "c", tmp_path) == []
    on_disk = pq.read_table(data)
    assert [r.tolist() for r in int_list_column(on_disk, "completion_token_ids", data)] == \
        on_disk.column("completion_token_ids").to_pylist()
    with pytest.raises(UserError, match="has null values inside its lists"):
        int_list_column(pa.table({"c": pa.array([[1, None]], kinds[0])}), "c", tmp_path)
    with pytest.raises(UserError, match="column 'c' is null in row 1"):
        int_list_column(pa.table({"c": pa.array([[1], None], kinds[0])}), "c", tmp_path)


def _scored_logits(model_dir, data):
    """(logits ``[N, V]``, tokens ``[N]``) at every completion token of ``data`` under the model in ``model_dir``."""
    from fdivctl.io.sequences import load_sequences
    from fdivctl.stages.signals import FrozenModel

    model = FrozenModel.load(model_dir, "student", "fp32", "cpu")
    seqs = load_sequences(data, AutoTokenizer.from_pretrained(model_dir))
    batch = seqs.batch(list(range(len(seqs))), 0)
    return model.hidden(batch) @ model.weight.T, batch["token"]


def test_trust_region_distills_only_where_the_teacher_stayed_near_the_base(tmp_path, student, data, tiny_teacher):
    """ERPD stage 2: token t counts only when |log p_T(y_t) − log q_0(y_t)| ≤ ε; the first step's loss is the
    masked per-token forward KL, by hand."""
    teacher_logits, tokens = _scored_logits(tiny_teacher, data)
    base_logits, _ = _scored_logits(student, data)
    gap = (teacher_logits.log_softmax(-1) - base_logits.log_softmax(-1)).gather(1, tokens[:, None]).squeeze(1).abs()
    epsilon = float(gap.median())
    mask = (gap <= epsilon).float()
    per_token = divergences.get("fkl").token_divergence(base_logits, teacher_logits)
    runs = {}
    for name, region in (("free", None), ("all", 1e6), ("region", epsilon)):
        opts = _opts(tmp_path / name, "fkl", steps=2)
        opts.trust_region = region
        (tmp_path / name).mkdir()
        run_distill(student, tmp_path / name / "ckpt", data, opts, teacher=tiny_teacher)
        runs[name] = _steps(tmp_path / name / "log.jsonl")
    assert [x["loss"] for x in runs["all"]] == [x["loss"] for x in runs["free"]]
    first = runs["region"][0]
    assert first["trust_region_kept"] == pytest.approx(float(mask.mean()))
    assert first["loss"] == pytest.approx(float((mask * per_token).sum() / len(tokens)), rel=1e-5)
    assert first["loss"] < runs["free"][0]["loss"]


def test_text_completions_end_with_eos_so_sft_learns_to_stop(tmp_path, tokenizer_dir):
    """A text completion gets the tokenizer's EOS appended (not twice, not to an empty one); SFT on completions
    written without it then gives a model that stops after the answer (before: it never saw EOS, and sampled to
    --max-new-tokens)."""
    from transformers import AutoTokenizer

    from fdivctl import tiny
    from fdivctl.io.sequences import sequences_from_table

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    table = pa.table({"prompt": ["1+2=", "1+2=", "1+2="], "completion": [" 3", " 3" + tok.eos_token, ""]})
    seqs = sequences_from_table(table, tmp_path, tok)
    answer = tok(" 3", add_special_tokens=False)["input_ids"]
    assert [c.tolist() for c in seqs.completion_tokens] == [answer + [tok.eos_token_id]] * 2 + [[]]

    model = tmp_path / "random"
    tiny.make_model(model, tok, seed=0, hidden=64, layers=1)
    prompts = ["1+2=", "2+2=", "3+3=", "1+1="]
    answers = [" 3", " 4", " 6", " 2"]
    data = tmp_path / "sft.parquet"
    pq.write_table(pa.table({"prompt": prompts * 4, "completion": answers * 4}), data)
    run_cli("train", model, tmp_path / "sft", "--algo", "sft", "--data", data, "--lr", "3e-3", "--batch-size", 8,
            "--max-steps", 60, "--lr-schedule", "constant", "--device", "cpu", check=True)
    pq.write_table(pa.table({"prompt_id": ["a", "b", "c", "d"], "prompt": prompts}), tmp_path / "prompts.parquet")
    run_cli("rollout", tmp_path / "sft", tmp_path / "prompts.parquet", tmp_path / "r.parquet", "--temperature", 0,
            "--max-new-tokens", 12, "--device", "cpu", check=True)
    rows = pq.read_table(tmp_path / "r.parquet").to_pylist()
    assert [r["finish_reason"] for r in rows] == ["stop"] * 4, [r["completion"] for r in rows]
    assert [r["completion"] for r in rows] == answers


def test_tensorboard_gets_the_logs_scalars_and_a_resume_redoes_no_step_twice(tmp_path, student, data, full_store):
    """--tensorboard DIR: every numeric field of each --log-jsonl record, as a scalar at its step.  A run logged step
    3 past its step-2 checkpoint; resumed from that checkpoint, it logs step 3 again: the directory reads as one run
    of steps 1..4, as the JSONL does, not with two step-3 points."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, log, board = tmp_path / "out", tmp_path / "log.jsonl", tmp_path / "board"
    args = ["--data", data, "--logits", full_store, "--batch-size", 2, "--device", "cpu", "--log-jsonl", log,
            "--tensorboard", board]
    run_cli("distill", student, out, *args, "--max-steps", 2, check=True)
    shutil.copytree(out, tmp_path / "at-step-2")
    run_cli("distill", student, out, *args, "--max-steps", 3, "--resume", check=True)
    run_cli("distill", student, tmp_path / "at-step-2", *args, "--max-steps", 4, "--resume", check=True)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    events = EventAccumulator(str(board))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {k for k, v in records[0].items() if k != "step" and
                                              isinstance(v, int | float)}
    for tag in ("loss", "grad_norm", "lr"):
        points = events.Scalars(tag)
        assert [p.step for p in points] == [1, 2, 3, 4]
        assert [p.value for p in points] == pytest.approx([r[tag] for r in records], rel=1e-6)
