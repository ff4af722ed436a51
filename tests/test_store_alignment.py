"""A logit store and the data it is read with are checked against each other before any training.

Before: a data row missing from the store, or one with another completion length, stopped a run only when a batch
first reached it (after hours, at a random step); a teacher given other prompt tokens than the data's (another
chat template, other prompt text) was not seen at all, since only completion tokens were compared.
"""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_runner import run_cli
from transformers import AutoTokenizer

from fdivctl.io.hashing import token_digest
from fdivctl.io.sequences import load_sequences

HINTED = ["Compute 1 + 2. Hint: it is 3.", "Compute 3 * 4. Hint: it is 12.", "Compute 2 + 2. Hint: it is 4."]
PLAIN = ["Compute 1 + 2.", "Compute 3 * 4.", "Compute 2 + 2."]
ANSWERS = [" The answer is 3.", " The answer is 12.", " The answer is 4."]


def _table(path, prompts, completions=ANSWERS, ids=("a", "b", "c")):
    pq.write_table(pa.table({"prompt_id": list(ids), "prompt": prompts, "completion": completions}), path)
    return path


@pytest.fixture(scope="module")
def hinted_store(tmp_path_factory, tiny_teacher):
    """A store of the teacher given hints in its prompts (context distillation's teacher)."""
    root = tmp_path_factory.mktemp("hinted")
    run_cli("teacher-logits", tiny_teacher, _table(root / "hinted.parquet", HINTED), root / "store", "--k", 8,
            "--device", "cpu", check=True)
    return root / "store"


def _distill(student, out, data, store, *extra):
    return run_cli("distill", student, out, "--data", data, "--logits", store, "--batch-size", 3, "--max-steps", 1,
                   "--device", "cpu", *extra)


def test_the_store_records_each_prompt_it_was_given(hinted_store, tiny_teacher):
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    index = pq.read_table(hinted_store / "index.parquet").to_pydict()
    seqs = load_sequences(hinted_store.parent / "hinted.parquet", tokenizer)
    assert index["prompt_sha256"] == [token_digest(p) for p in seqs.prompt_tokens]


def test_other_prompts_are_refused_unless_asked_for(tmp_path, hinted_store, student):
    plain = _table(tmp_path / "plain.parquet", PLAIN)
    done = _distill(student, tmp_path / "out", plain, hinted_store)
    assert done.returncode == 2 and not (tmp_path / "out").exists(), done.stderr
    assert "the teacher was given other prompt tokens for prompt_id 'a' sample_idx 0" in done.stderr
    assert "--allow-prompt-mismatch" in done.stderr
    allowed = _distill(student, tmp_path / "out", plain, hinted_store, "--allow-prompt-mismatch")
    assert allowed.returncode == 0, allowed.stderr
    same = _distill(student, tmp_path / "same", hinted_store.parent / "hinted.parquet", hinted_store)
    assert same.returncode == 0, same.stderr


@pytest.mark.parametrize("ids, completions, message", [
    (("a", "b", "z"), ANSWERS, "has no sequence prompt_id 'z' sample_idx 0 of"),
    (("a", "b", "c"), ANSWERS[:2] + [" The answer is 4, since 2 + 2 is 4."], "completion tokens, the store"),
])
def test_rows_the_store_cannot_serve_are_refused_before_training(tmp_path, hinted_store, student, ids, completions,
                                                                 message):
    data = _table(tmp_path / "data.parquet", HINTED, completions, ids)
    done = _distill(student, tmp_path / "out", data, hinted_store)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()  # nothing started


def test_staged_rl_checks_its_reference_store_against_the_rollouts(tmp_path, task, scored_rollouts):
    """--ref-logits made from the same rollouts is accepted; a store of other sequences is refused up front."""
    store = tmp_path / "ref"
    run_cli("teacher-logits", task / "sft", scored_rollouts, store, "--k", 8, "--device", "cpu", check=True)
    common = ["--rollouts", scored_rollouts, "--divergence", "rkl", "--div-estimator", "full", "--ref-logits", store,
              "--max-steps", 1, "--device", "cpu"]
    assert run_cli("train", task / "sft", tmp_path / "ok", *common).returncode == 0
    table = pq.read_table(scored_rollouts)
    other = tmp_path / "other.parquet"
    pq.write_table(table.set_column(0, "prompt_id", pa.array([f"x{p}" for p in table.column("prompt_id").to_pylist()])),
                   other)
    done = run_cli("train", task / "sft", tmp_path / "bad", *[other if a == scored_rollouts else a for a in common])
    assert done.returncode == 2 and "has no sequence prompt_id 'x" in done.stderr, done.stderr
