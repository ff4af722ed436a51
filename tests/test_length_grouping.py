"""--group-by-length: each optimizer step of fixed sequences holds examples of similar length (HF's group_by_length).

Before: examples were drawn in a random order only, so a batch of mixed lengths was padded to its longest sequence
(1.75 tokens processed per real token at lengths 16..512, batch 8: bench/length_grouping.py).
"""

import collections

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cli_runner import run_cli

from fdivctl.errors import UserError
from fdivctl.training.loop import LENGTH_GROUP_STEPS, LoopOptions, batches_for_step, run_loop


def _epoch(n, lengths, **options):
    opts = LoopOptions(**options)
    per_epoch = n // (opts.batch_size * opts.grad_accum)
    return [batches_for_step(n, step, opts, lengths) for step in range(per_epoch)]


def _padding(steps, lengths):
    real = sum(lengths[r] for step in steps for rows in step for r in rows)
    return sum(len(rows) * max(lengths[r] for r in rows) for step in steps for rows in step) / real


def test_an_epoch_takes_the_same_examples_in_steps_of_similar_length():
    g = torch.Generator().manual_seed(1)
    n = 8 * 4 * LENGTH_GROUP_STEPS * 2 + 16  # two full groups and a partial one
    lengths = torch.randint(10, 1000, (n,), generator=g).tolist()
    plain = _epoch(n, lengths, batch_size=8, grad_accum=4)
    grouped = _epoch(n, lengths, batch_size=8, grad_accum=4, group_by_length=True)
    assert grouped == _epoch(n, lengths, batch_size=8, grad_accum=4, group_by_length=True)  # deterministic
    assert collections.Counter(r for s in grouped for m in s for r in m) == \
        collections.Counter(r for s in plain for m in s for r in m)  # the same examples, each once
    assert len(grouped) == len(plain) and all(len(s) == 4 and all(len(m) == 8 for m in s) for s in grouped)
    assert _padding(plain, lengths) > 1.5 and _padding(grouped, lengths) < 1.05
    # the steps of a group come in a shuffled order: no trend from short to long
    means = [sum(lengths[r] for m in s for r in m) / 32 for s in grouped[:LENGTH_GROUP_STEPS]]
    assert means != sorted(means) and means != sorted(means, reverse=True)
    # another epoch, another grouping
    assert batches_for_step(n, len(plain), LoopOptions(batch_size=8, grad_accum=4, group_by_length=True),
                            lengths) != grouped[0]


def test_a_run_without_lengths_is_refused():
    with pytest.raises(UserError, match="--group-by-length groups fixed sequences by their lengths"):
        run_loop(None, None, 4, None, None, LoopOptions(group_by_length=True))


def test_sft_and_fdpo_run_grouped_and_the_other_algorithms_refuse_it(tmp_path, student):
    data = tmp_path / "sft.parquet"
    pq.write_table(pa.table({"prompt": ["1+1=", "2+2=", "3+3=", "4+4="],
                             "completion": [" 2", " 4 and a longer answer here", " 6", " 8 so"]}), data)
    common = ["--max-steps", 2, "--batch-size", 2, "--group-by-length", "--device", "cpu"]
    run_cli("train", student, tmp_path / "sft", "--algo", "sft", "--data", data, *common, check=True)
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["1+1=", "2+2="], "chosen": [" 2", " 4"], "rejected": [" 3", " 5 or more"]}),
                   pairs)
    run_cli("train", student, tmp_path / "fdpo", "--algo", "fdpo", "--pairs", pairs, *common, check=True)
    done = run_cli("train", student, tmp_path / "grpo", "--rollouts", data, *common)
    assert done.returncode == 2 and "--group-by-length groups fixed sequences: --algo sft's --data" in done.stderr
    done = run_cli("distill", student, tmp_path / "opd", "--on-policy", "--prompts", data, "--teacher", student,
                   *common)
    assert done.returncode == 2 and "on-policy samples have no length before they are drawn" in done.stderr
