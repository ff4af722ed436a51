"""teacher-logits on a tiny random Qwen2 teacher: round trip, resume, verify, shards, errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fdivctl.errors import UserError
from fdivctl.io.logit_store import LogitStore, verify_store
from fdivctl.io.tables import write_table
from cli_runner import run_cli


def _sequences(path: Path, tokenizer, n: int = 12, seed: int = 0) -> Path:
    """A rollouts-like table: token ids of varied lengths, two samples per prompt."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    rows = {"prompt_id": [], "sample_idx": [], "prompt_token_ids": [], "completion_token_ids": []}
    for i in range(n):
        rows["prompt_id"].append(f"p{i // 2}")
        rows["sample_idx"].append(i % 2)
        rows["prompt_token_ids"].append(torch.randint(3, vocab, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist())
        rows["completion_token_ids"].append(torch.randint(3, vocab, (int(torch.randint(0, 12, (1,), generator=g)),), generator=g).tolist())
    table = pa.table(
        {
            "prompt_id": rows["prompt_id"],
            "sample_idx": pa.array(rows["sample_idx"], pa.int64()),
            "prompt_token_ids": pa.array(rows["prompt_token_ids"], pa.list_(pa.int32())),
            "completion_token_ids": pa.array(rows["completion_token_ids"], pa.list_(pa.int32())),
        }
    )
    write_table(path, table, {})
    return path


def _cli(*args, check=True):
    return run_cli(*args, check=check)


@pytest.fixture(scope="module")
def seqs(tmp_path_factory, tiny_teacher):
    return _sequences(tmp_path_factory.mktemp("seqs") / "rollouts.parquet", AutoTokenizer.from_pretrained(tiny_teacher))


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher, seqs):
    out = tmp_path_factory.mktemp("store") / "logits"
    _cli("teacher-logits", tiny_teacher, seqs, out, "--k", 16, "--temperature", 1.5,
         "--dtype", "fp32", "--max-tokens-per-shard", 12, "--batch-size", 3, "--device", "cpu")
    return out


def _store_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if not p.name.startswith(".")}


def test_round_trip_matches_a_direct_forward(store, seqs, tiny_teacher):
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    table = pq.read_table(seqs).to_pylist()
    reader = LogitStore(store)
    assert len(reader) == len(table) and reader.k == 16 and reader.temperature == 1.5
    for row in table:
        got = reader.sequence(row["prompt_id"], row["sample_idx"])
        prompt, completion = row["prompt_token_ids"], row["completion_token_ids"]
        assert got.token_ids.tolist() == completion
        if not completion:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0].float()
        log_p = torch.log_softmax(logits[len(prompt) - 1 : -1] / 1.5, -1)
        top, ids = log_p.topk(16, -1)
        torch.testing.assert_close(got.logprobs, top, atol=1e-5, rtol=1e-5)
        assert (got.ids == ids.to(torch.int32)).float().mean() > 0.99  # ties may swap
        torch.testing.assert_close(got.log_tail, torch.log1p(-top.exp().sum(-1)), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            got.token_logprob, log_p.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1), atol=1e-5, rtol=1e-5
        )


def test_manifest_records_provenance(store, seqs):
    manifest = json.loads((store / "manifest.json").read_text())
    for key in ("teacher_hash", "tokenizer_hash", "vocab_size", "k", "temperature", "dtype", "source_sha256",
                "source_rows", "shards"):
        assert key in manifest
    assert manifest["vocab_size"] == 320 and manifest["source_rows"] == 12
    assert manifest["versions"]["torch"] == torch.__version__ and "transformers" in manifest["versions"]
    assert len(manifest["shards"]) > 2 and all(len(s["sha256"]) == 64 for s in manifest["shards"])
    assert verify_store(store) == []
    assert _cli("teacher-logits", "--verify", store).stdout.strip().endswith("ok")


def test_resume_after_interruption_gives_an_identical_store(tmp_path, store, seqs, tiny_teacher):
    """The on-disk state a kill leaves (some shards done, a temp file, no manifest), then a rerun."""
    partial = tmp_path / "logits"
    shutil.copytree(store, partial)
    (partial / "manifest.json").unlink()
    (partial / "index.parquet").unlink()
    for name in ("shard-00001.json", "shard-00001.safetensors", "shard-00002.json"):
        (partial / name).unlink()
    (partial / ".shard-00001.safetensors.abc.tmp").write_bytes(b"half a shard")
    with pytest.raises(Exception, match="incomplete"):
        LogitStore(partial)
    done = _cli("teacher-logits", tiny_teacher, seqs, partial, "--k", 16, "--temperature", 1.5, "--dtype", "fp32",
                "--max-tokens-per-shard", 12, "--batch-size", 3, "--device", "cpu")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["shards_written"] == 2 and summary["complete"]
    (partial / ".shard-00001.safetensors.abc.tmp").unlink()
    assert _store_files(partial) == _store_files(store)


def test_killed_process_resumes(tmp_path, seqs, tiny_teacher, store):
    """A real SIGKILL midway (when it lands before the end), then the same command again."""
    out = tmp_path / "logits"
    args = [sys.executable, "-m", "fdivctl", "teacher-logits", str(tiny_teacher), str(seqs), str(out), "--k", "16",
            "--temperature", "1.5", "--dtype", "fp32", "--max-tokens-per-shard", "12", "--batch-size", "3",
            "--device", "cpu"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import time

    deadline = time.time() + 60
    while time.time() < deadline and not (out / "shard-00001.json").exists() and proc.poll() is None:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    _cli(*args[3:])
    assert verify_store(out) == []
    assert _store_files(out) == _store_files(store)


def test_sharded_processes_make_the_same_store(tmp_path, seqs, tiny_teacher, store):
    out = tmp_path / "logits"
    common = ["--k", 16, "--temperature", 1.5, "--dtype", "fp32", "--max-tokens-per-shard", 12,
              "--batch-size", 3, "--device", "cpu"]
    first = json.loads(_cli("teacher-logits", tiny_teacher, seqs, out, *common, "--shard", "0/2").stdout.splitlines()[-1])
    assert not first["complete"] and not (out / "manifest.json").exists()
    second = json.loads(_cli("teacher-logits", tiny_teacher, seqs, out, *common, "--shard", "1/2").stdout.splitlines()[-1])
    assert second["complete"]
    assert _store_files(out) == _store_files(store)


def test_verify_detects_corruption_missing_shard_and_duplicated_row(tmp_path, store):
    corrupted = tmp_path / "corrupted"
    shutil.copytree(store, corrupted)
    shard = corrupted / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert any("checksum" in p for p in verify_store(corrupted))
    done = _cli("teacher-logits", "--verify", corrupted, check=False)
    assert done.returncode == 1 and "checksum" in done.stderr
    # a reader checks each shard as it first opens it: the sound shard reads, the damaged one is refused
    index = pq.read_table(corrupted / "index.parquet").to_pylist()
    in_shard = {row["shard"]: (row["prompt_id"], row["sample_idx"]) for row in index}
    reader = LogitStore(corrupted)
    assert len(reader.sequence(*in_shard[0]).ids) > 0
    with pytest.raises(UserError, match="shard-00001.safetensors is corrupted .* --verify"):
        reader.sequence(*in_shard[1])

    missing = tmp_path / "missing"
    shutil.copytree(store, missing)
    (missing / "shard-00000.safetensors").unlink()
    assert any("missing" in p for p in verify_store(missing))
    with pytest.raises(UserError, match="shard-00000.safetensors is missing"):
        LogitStore(missing).sequence(*in_shard[0])

    duplicated = tmp_path / "duplicated"
    shutil.copytree(store, duplicated)
    index = pq.read_table(duplicated / "index.parquet").to_pylist()
    index[1] = {**index[1], "source_row": index[0]["source_row"]}
    pq.write_table(pa.Table.from_pylist(index, schema=pq.read_schema(duplicated / "index.parquet")), duplicated / "index.parquet")
    problems = verify_store(duplicated)
    assert any("more than once" in p for p in problems) and any("not covered" in p for p in problems)


def test_include_prompt_and_low_precision_storage(tmp_path, seqs, tiny_teacher):
    out = tmp_path / "logits"
    _cli("teacher-logits", tiny_teacher, seqs, out, "--k", 8, "--include-prompt", "--dtype", "bf16", "--device", "cpu")
    reader = LogitStore(out)
    row = pq.read_table(seqs).to_pylist()[0]
    got = reader.sequence(row["prompt_id"], row["sample_idx"])
    full = row["prompt_token_ids"] + row["completion_token_ids"]
    assert got.token_ids.tolist() == full[1:]
    assert got.completion_start == len(row["prompt_token_ids"]) - 1
    assert got.logprobs.dtype == torch.bfloat16
    assert verify_store(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    shard_bytes = sum((out / s["file"]).stat().st_size for s in manifest["shards"])
    assert shard_bytes / manifest["n_tokens"] <= 6 * 8 + 16 + 1  # +1: the safetensors header, amortized


def test_text_sequences_are_tokenized_with_the_teacher(tmp_path, tiny_teacher):
    path = tmp_path / "text.parquet"
    pq.write_table(pa.table({"prompt": ["Compute 3 + 4.", "Compute 9 * 9."], "completion": [" The answer is 7.", " 81"]}), path)
    out = tmp_path / "logits"
    _cli("teacher-logits", tiny_teacher, path, out, "--k", 4, "--device", "cpu")
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    got = LogitStore(out).sequence("0", 0)
    # a text completion ends with EOS (appended): the teacher's stopping distribution is stored too
    assert got.token_ids.tolist() == tok(" The answer is 7.", add_special_tokens=False)["input_ids"] + \
        [tok.eos_token_id]


def test_tokenizer_mismatch_is_refused(tmp_path, store, tiny_teacher, seqs):
    reader = LogitStore(store)
    with pytest.raises(Exception, match="tokenizer mismatch: student has tokenizer hash 0000"):
        reader.check_tokenizer("0" * 64, "student")
    reader.check_tokenizer("0" * 64, "student", allow_mismatch=True)
    # a rollouts file recorded with another tokenizer
    other = tmp_path / "other.parquet"
    write_table(other, pq.read_table(seqs), {"tokenizer_hash": "f" * 64})
    done = _cli("teacher-logits", tiny_teacher, other, tmp_path / "x", "--device", "cpu", check=False)
    assert done.returncode == 2 and "tokenizer mismatch" in done.stderr and "ffff" in done.stderr
    assert not (tmp_path / "x").exists()


def test_store_for_other_sequences_is_named(store):
    with pytest.raises(Exception, match="made for other sequences"):
        LogitStore(store).sequence("nope", 0)


@pytest.mark.parametrize(
    "table, message",
    [
        (pa.table({"prompt": ["a"]}), "needs prompt_token_ids \\+ completion_token_ids"),
        (pa.table({"prompt_token_ids": ["x"], "completion_token_ids": ["y"]}), "must be list<int>"),
        (pa.table({"prompt_id": ["a", "a"], "prompt": ["x", "y"], "completion": ["1", "2"]}), "is not unique"),
        (pa.table({"prompt": pa.array([], pa.string()), "completion": pa.array([], pa.string())}), "the table is empty"),
        (pa.table({"prompt": ["a", "b"], "completion": ["", ""]}), "no token to score: every completion is empty"),
    ],
)
def test_bad_sequences_exit_2_without_output(tmp_path, tiny_teacher, table, message):
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    done = _cli("teacher-logits", tiny_teacher, path, tmp_path / "out", "--device", "cpu", check=False)
    assert done.returncode == 2, done.stderr
    assert message.replace("\\", "") in done.stderr.replace("\\", "") and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bad_teacher_and_options(tmp_path, seqs, tiny_teacher):
    done = _cli("teacher-logits", tmp_path, seqs, tmp_path / "out", check=False)
    assert done.returncode == 2 and "no config.json" in done.stderr
    done = _cli("teacher-logits", tiny_teacher, seqs, tmp_path / "out", "--k", 999, "--device", "cpu", check=False)
    assert done.returncode == 2 and "exceeds the teacher's vocabulary size 320" in done.stderr
    done = _cli("teacher-logits", tiny_teacher, seqs, tmp_path / "out", "--shard", "2/2", check=False)
    assert done.returncode == 2 and "--shard" in done.stderr
    done = _cli("teacher-logits", tiny_teacher, tmp_path / "none.parquet", tmp_path / "out", check=False)
    assert done.returncode == 2 and "no such file" in done.stderr


def test_verify_detects_a_wrong_dtype_with_a_consistent_checksum(tmp_path, store):
    from safetensors.torch import load_file, save_file

    from fdivctl.io.hashing import file_sha256

    bad = tmp_path / "bad"
    shutil.copytree(store, bad)
    shard = bad / "shard-00000.safetensors"
    tensors = load_file(str(shard))
    tensors["logprobs"] = tensors["logprobs"].to(torch.float16)
    save_file(tensors, str(shard))
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = file_sha256(shard)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert any("logprobs has dtype F16, expected F32" in p for p in verify_store(bad))


def test_a_plain_text_table_is_scored_on_every_token(tmp_path, tiny_teacher):
    """A ``text`` column (TRL's language-modeling layout): every token after the first is scored, then EOS, as
    TRL's SFTTrainer trains on it; SFT and distillation read it the same way, and --chat, which has no prompt to
    wrap, is one line (was: refused as a table with no known columns)."""
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    texts = ["the cat sat on the mat", "a dog"]
    data = tmp_path / "text.parquet"
    pq.write_table(pa.table({"text": texts}), data)
    run_cli("teacher-logits", tiny_teacher, data, tmp_path / "store", "--k", 4, "--device", "cpu", check=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    reader = LogitStore(tmp_path / "store")
    for row, text in enumerate(texts):
        ids = tok(text)["input_ids"] + [tok.eos_token_id]
        got = reader.sequence(str(row), 0)
        assert got.token_ids.tolist() == ids[1:] and got.completion_start == 0
        with torch.no_grad():
            log_p = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
        torch.testing.assert_close(got.token_logprob, log_p.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1),
                                   atol=1e-5, rtol=1e-5)
    sft = run_cli("train", tiny_teacher, tmp_path / "sft", "--algo", "sft", "--data", data, "--max-steps", 1,
                  "--device", "cpu")
    assert sft.returncode == 0, sft.stderr
    kd = run_cli("distill", tiny_teacher, tmp_path / "kd", "--data", data, "--logits", tmp_path / "store",
                 "--max-steps", 1, "--device", "cpu")
    assert kd.returncode == 0, kd.stderr
    chat = run_cli("teacher-logits", tiny_teacher, data, tmp_path / "chat", "--chat", "--device", "cpu")
    assert chat.returncode == 2 and "a text column has none: drop --chat" in chat.stderr, chat.stderr
    assert not (tmp_path / "chat").exists()


def test_a_shard_is_batched_longest_first_and_indexed_in_the_files_order(tmp_path, tiny_teacher, seqs, monkeypatch):
    """Each batch holds sequences of similar length (was: the file's order, and a batch of mixed lengths is padded
    to its longest), and the index keeps the file's order."""
    from fdivctl.io.sequences import Sequences
    from fdivctl.stages.teacher_logits import TeacherLogitsOptions, run_teacher_logits

    batches, batch = [], Sequences.batch
    monkeypatch.setattr(Sequences, "batch", lambda self, rows, *a, **k: batches.append(
        [len(self.prompt_tokens[r]) + len(self.completion_tokens[r]) for r in rows]) or batch(self, rows, *a, **k))
    run_teacher_logits(tiny_teacher, seqs, tmp_path / "store", TeacherLogitsOptions(k=4, batch_size=3, device="cpu"))
    lengths = [n for b in batches for n in b]
    assert lengths == sorted(lengths, reverse=True) and len(batches) == 4  # one shard: 12 rows, 3 per batch
    index = pq.read_table(tmp_path / "store" / "index.parquet")
    assert index.column("source_row").to_pylist() == list(range(12))


def test_a_shard_file_is_byte_for_byte_what_safetensors_writes_and_its_checksum_is_the_files(tmp_path, monkeypatch):
    """The store's one-pass writer (hashing on the way, no second read) writes the bytes of
    ``safetensors.torch.save_file`` for every store dtype, an empty tensor and a strided one, in blocks that cut
    tensors mid-element."""
    from safetensors.torch import save_file

    from fdivctl.io import tensor_file
    from fdivctl.io.hashing import file_sha256
    from fdivctl.io.tensor_file import save_safetensors

    monkeypatch.setattr(tensor_file, "_BLOCK", 100)

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        tensors = {"ids": torch.randint(0, 1000, (37, 5), dtype=torch.int32),
                   "logprobs": torch.randn(37, 5).to(dtype), "log_tail": torch.randn(74)[::2],
                   "token_ids": torch.arange(37, dtype=torch.int32), "empty": torch.zeros(0, 3),
                   "steps": torch.arange(3)}
        ours, theirs = tmp_path / f"ours-{dtype}.safetensors", tmp_path / f"theirs-{dtype}.safetensors"
        digest = save_safetensors(tensors, ours)
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(theirs))
        assert ours.read_bytes() == theirs.read_bytes() and digest == file_sha256(ours)
    with pytest.raises(ValueError, match="no safetensors dtype name"):
        save_safetensors({"mask": torch.ones(2, dtype=torch.bool)}, tmp_path / "bool.safetensors")


def test_default_shards_hold_about_64_mib_and_a_resumed_store_keeps_its_own(tmp_path, tiny_teacher, seqs):
    """Without --max-tokens-per-shard a new store's shards hold ⌊64 MiB / bytes per token⌋ tokens (the files
    are about that size); a store made with another limit is resumed with it, not refused."""
    from fdivctl.io.logit_store import SHARD_BYTES, default_shard_tokens

    assert default_shard_tokens(tmp_path / "new", 64, "bf16") == SHARD_BYTES // (64 * 6 + 12) == 169_466
    assert default_shard_tokens(tmp_path / "new", 256, "fp32") == SHARD_BYTES // (256 * 8 + 12)
    out = tmp_path / "store"
    _cli("teacher-logits", tiny_teacher, seqs, out, "--k", 4, "--max-tokens-per-shard", 20, "--device", "cpu")
    first = _store_files(out)
    assert json.loads((out / "store.json").read_text())["max_tokens_per_shard"] == 20
    assert default_shard_tokens(out, 4, "bf16") == 20
    (out / "shard-00001.json").unlink()  # as if interrupted: the rerun, without the option, finishes it
    (out / "manifest.json").unlink()
    _cli("teacher-logits", tiny_teacher, seqs, out, "--k", 4, "--device", "cpu")
    assert _store_files(out) == first


def test_shards_are_cut_between_whole_batches(tmp_path, tiny_teacher, seqs):
    """A full shard ends after a whole number of batches where one batch fits (so no shard but the last is
    scored with a short batch), never passes the token limit, and the plan covers every row once in order."""
    from fdivctl.io.logit_store import plan_shards

    counts = [5, 7, 3, 6, 2, 9, 4, 4, 8, 1]
    for limit, batch in [(12, 1), (12, 2), (20, 3), (40, 4), (6, 3)]:
        plan = plan_shards(counts, limit, batch)
        assert [s["rows"][0] for s in plan[1:]] == [s["rows"][1] for s in plan[:-1]]
        assert plan[0]["rows"][0] == 0 and plan[-1]["rows"][1] == len(counts)
        for shard in plan:
            first, end = shard["rows"]
            assert shard["n_tokens"] == sum(counts[first:end])
            assert shard["n_tokens"] <= limit or end - first == 1
        for shard in plan[:-1]:
            first, end = shard["rows"]
            fits_a_batch = sum(counts[first : first + batch]) <= limit
            if fits_a_batch:  # cut after whole batches, and only where the next batch would not fit
                assert (end - first) % batch == 0
                assert sum(counts[first : end + batch]) > limit
            else:
                assert sum(counts[first : end + 1]) > limit
    assert [s["rows"] for s in plan_shards(counts, 12, 2)] == [[0, 2], [2, 4], [4, 6], [6, 8], [8, 10]]
    assert [s["rows"] for s in plan_shards(counts, 12)] == [[0, 2], [2, 5], [5, 6], [6, 8], [8, 10]]
    out = tmp_path / "logits"  # the CLI plans with its --batch-size: batches of 3, at most 20 tokens a shard
    _cli("teacher-logits", tiny_teacher, seqs, out, "--k", 4, "--max-tokens-per-shard", 20, "--batch-size", 3,
         "--device", "cpu")
    settings = json.loads((out / "store.json").read_text())
    counts = [len(c) for c in pq.read_table(seqs)["completion_token_ids"].to_pylist()]
    assert settings["shards"] == plan_shards(counts, 20, 3) != plan_shards(counts, 20)
    assert all((end - first) % 3 == 0 for first, end in (s["rows"] for s in settings["shards"]))
    assert verify_store(out) == []


def test_a_store_planned_with_every_row_a_cut_resumes_with_its_own_plan(tmp_path, tiny_teacher, seqs):
    """A store begun before shards ended between whole batches (its recorded plan cut after any row) is
    finished with that plan, not refused for differing settings; a plan of neither kind is still refused."""
    from fdivctl.io.logit_store import plan_shards

    args = ("teacher-logits", tiny_teacher, seqs, tmp_path / "logits", "--k", 4, "--max-tokens-per-shard", 20,
            "--batch-size", 3, "--device", "cpu")
    out = tmp_path / "logits"
    _cli(*args)
    counts = [len(c) for c in pq.read_table(seqs)["completion_token_ids"].to_pylist()]
    settings = json.loads((out / "store.json").read_text())
    old_plan = plan_shards(counts, 20)
    assert settings["shards"] != old_plan
    for path in out.iterdir():  # as the earlier version left it, interrupted before its first shard was done
        if path.name != "store.json":
            path.unlink()
    (out / "store.json").write_text(json.dumps({**settings, "shards": old_plan}))
    _cli(*args)
    assert json.loads((out / "manifest.json").read_text())["shards"][1]["rows"] == old_plan[1]["rows"]
    assert verify_store(out) == []
    for path in out.iterdir():
        if path.name != "store.json":
            path.unlink()
    (out / "store.json").write_text(json.dumps({**settings, "shards": plan_shards(counts, 20, 2)}))
    result = _cli(*args, check=False)
    assert result.returncode != 0 and "other settings (shards)" in result.stderr
