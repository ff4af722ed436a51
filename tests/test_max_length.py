"""--max-length: sequences cut to a token budget, keeping their start (TRL's max_length), in teacher-logits, distill
and train --algo sft.

Before: a sequence longer than the model's context was refused, and there was no way to train on the start of long
documents but to cut them in a separate step.
"""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_runner import run_cli
from transformers import AutoTokenizer

from fdivctl.errors import UserError
from fdivctl.io.logit_store import LogitStore
from fdivctl.io.sequences import Sequences, read_sequences

TEXTS = ["the cat sat on the mat and then the cat sat on the mat again", "a dog", "one two three four five six"]


def _summary(done) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_truncate_cuts_completions_keeping_their_start_and_names_the_rows_a_prompt_fills():
    seqs = Sequences(["a", "b", "c"], [0, 0, 0], [np.arange(3), np.arange(2), np.arange(5)],
                     [np.arange(10, 20), np.arange(10, 12), np.arange(0)], None)
    assert seqs.truncate(5) == ([0], [])  # only row a is longer than 5 tokens; c fits with its empty completion
    assert seqs.completion_tokens[0].tolist() == [10, 11] and seqs.completion_tokens[1].tolist() == [10, 11]
    assert seqs.truncate(3) == ([1], [0, 2])  # a's and c's prompts fill 3 tokens: nothing of them is trained on
    assert seqs.take([1]).prompt_ids == ["b"] and seqs.take([1]).completion_tokens[0].tolist() == [10]


def test_rows_whose_prompt_fills_max_length_are_dropped_from_the_table_too(tmp_path, tiny_teacher):
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    path = tmp_path / "long_prompt.parquet"
    pq.write_table(pa.table({"prompt_id": ["long", "short"], "prompt": ["one two three four five six seven", "a"],
                             "completion": [" b", " c d e f g h i j k"], "pass_rate": [0.5, 1.0]}), path)
    table, seqs = read_sequences(path, tokenizer, max_length=4)
    assert (seqs.truncated, seqs.dropped, seqs.prompt_ids) == (1, 1, ["short"])
    assert table.column("prompt_id").to_pylist() == ["short"] and table.column("pass_rate").to_pylist() == [1.0]
    assert len(seqs.prompt_tokens[0]) + len(seqs.completion_tokens[0]) == 4
    done = run_cli("teacher-logits", tiny_teacher, path, tmp_path / "store", "--k", 4, "--max-length", 4, "--device",
                   "cpu", check=True)
    assert (_summary(done)["truncated_rows"], _summary(done)["dropped_rows"]) == (1, 1)
    assert len(LogitStore(tmp_path / "store")) == 1
    done = run_cli("distill", tiny_teacher, tmp_path / "kd", "--data", path, "--logits", tmp_path / "store",
                   "--max-length", 4, "--prompt-weighting", "paced", "--max-steps", 1, "--device", "cpu", check=True)
    assert (_summary(done)["truncated_rows"], _summary(done)["dropped_rows"]) == (1, 1)
    pq.write_table(pq.read_table(path).slice(0, 1), path)
    with pytest.raises(UserError, match="every prompt alone fills --max-length 4: no sequence is left"):
        read_sequences(path, tokenizer, max_length=4)


def test_a_turn_ids_column_is_cut_with_its_completion(tmp_path, tiny_teacher):
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    path = tmp_path / "turns.parquet"
    pq.write_table(pa.table({"prompt_token_ids": pa.array([[5, 6], [5]], pa.list_(pa.int32())),
                             "completion_token_ids": pa.array([[7, 8, 9, 10], [7]], pa.list_(pa.int32())),
                             "turn_ids": pa.array([[0, 0, 1, 1], [0]], pa.list_(pa.int32()))}), path)
    table, seqs = read_sequences(path, tokenizer, max_length=5)
    assert seqs.truncated == 1 and [c.tolist() for c in seqs.completion_tokens] == [[7, 8, 9], [7]]
    assert table.column("turn_ids").to_pylist() == [[0, 0, 1], [0]]


def test_a_store_and_its_distillation_cut_alike(tmp_path, tiny_teacher, student):
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    data = tmp_path / "text.parquet"
    pq.write_table(pa.table({"text": TEXTS}), data)
    store = tmp_path / "store"
    done = run_cli("teacher-logits", tiny_teacher, data, store, "--k", 4, "--max-length", 6, "--device", "cpu",
                   check=True)
    assert (_summary(done)["truncated_rows"], _summary(done)["dropped_rows"]) == (2, 0)  # "a dog" fits
    ids = tokenizer(TEXTS[0])["input_ids"]
    assert LogitStore(store).sequence("0", 0).token_ids.tolist() == ids[1:6]  # the first 6 tokens, first unscored
    common = ["--data", data, "--logits", store, "--max-steps", 1, "--device", "cpu"]
    done = run_cli("distill", student, tmp_path / "kd", *common, "--max-length", 6, check=True)
    assert _summary(done)["truncated_rows"] == 2
    for extra, said in (([], "was made with --max-length 6: give the same here (this run is without --max-length)"),
                        (["--max-length", 7], "(this run is with --max-length 7)")):
        done = run_cli("distill", student, tmp_path / "other", *common, *extra)
        assert done.returncode == 2 and said in done.stderr, done.stderr
    sft = run_cli("train", student, tmp_path / "sft", "--algo", "sft", "--data", data, "--max-length", 6,
                  "--max-steps", 1, "--device", "cpu", check=True)
    assert _summary(sft)["truncated_rows"] == 2


def test_fdpo_cuts_both_responses_and_refuses_given_reference_log_probs_then(tmp_path, student):
    tokenizer = AutoTokenizer.from_pretrained(student)
    pairs = tmp_path / "pairs.parquet"
    base = {"prompt": ["1+1=", "2+2="], "chosen": [" two " * 6, " 4"], "rejected": [" 3", " five " * 6]}
    pq.write_table(pa.table(base), pairs)
    common = ["--algo", "fdpo", "--pairs", pairs, "--max-steps", 1, "--batch-size", 2, "--device", "cpu"]
    done = run_cli("train", student, tmp_path / "fdpo", *common, "--max-length", 6, check=True)
    assert _summary(done)["truncated_rows"] == 2  # row 0's chosen, row 1's rejected
    cache = pq.read_table(tmp_path / "fdpo" / "fdivctl_run" / "reference_logprobs.parquet")
    assert cache.num_rows == 2 and len(tokenizer("1+1=")["input_ids"]) < 6
    pq.write_table(pa.table({**base, "ref_chosen_logp": [-1.0, -2.0], "ref_rejected_logp": [-1.0, -2.0]}), pairs)
    done = run_cli("train", student, tmp_path / "given", *common, "--max-length", 6)
    assert done.returncode == 2 and "--max-length 6 cuts or drops 2 pairs, and the table's reference log-probs are " \
        "of the whole responses" in done.stderr, done.stderr


@pytest.mark.parametrize("args, message", [
    (["train", "--algo", "grpo", "--rollouts", "x.parquet", "--max-length", 8],
     "--max-length cuts fixed sequences: --algo sft's --data and fdpo's --pairs"),
    (["distill", "--on-policy", "--prompts", "p.parquet", "--teacher", "t", "--max-length", 8],
     "--max-length cuts fixed sequences: on-policy, --max-new-tokens bounds the samples"),
    (["teacher-logits", "t", "s.parquet", "o", "--max-length", 1], "--max-length must be ≥ 2 tokens, got 1"),
])
def test_bad_max_length_is_one_line(tmp_path, student, args, message):
    command, *rest = args
    if command == "teacher-logits":
        done = run_cli(command, *rest)
    else:
        done = run_cli(command, student, tmp_path / "out", *rest, "--device", "cpu")
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()
