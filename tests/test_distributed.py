"""torchrun with 2 gloo processes on the CPU: FSDP2 distill equals one process with the same global batch,
and a run resumes on another number of processes."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cli_runner import run_cli, run_torchrun
from conftest import write_sequences
from safetensors.torch import load_file
from transformers import AutoTokenizer

from fdivctl import tiny


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer_dir):
    path = tmp_path_factory.mktemp("student")
    tiny.make_model(path, AutoTokenizer.from_pretrained(tokenizer_dir), seed=5, layers=2)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_teacher):
    """Sequences of equal length: each rank's token mean is then a mean over the same count."""
    vocab = len(AutoTokenizer.from_pretrained(tiny_teacher))
    return write_sequences(tmp_path_factory.mktemp("data") / "seqs.parquet", vocab, 16, 5, 8, seed=7)


def _args(student, out, data, teacher, steps, *extra):
    return ["distill", student, out, "--data", data, "--teacher", teacher, "--loss", "jsd", "--lr", 3e-3,
            "--lr-schedule", "constant", "--batch-size", 4, "--grad-accum", 2, "--max-steps", steps,
            "--device", "cpu", *extra]


def _close(a, b, atol=2e-5, file="model.safetensors"):
    wa, wb = load_file(a / file), load_file(b / file)
    assert set(wa) == set(wb)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=atol, rtol=0)


@pytest.mark.slow  # two processes, 18–32 s on 2 cores: .ci/run's slow pass keeps the default run under 10 minutes
def test_two_gloo_processes_equal_one_and_resume_across_world_sizes(tmp_path, student, data, tiny_teacher):
    single, sharded, resumed = tmp_path / "single", tmp_path / "sharded", tmp_path / "resumed"
    log_single, log_sharded = tmp_path / "single.jsonl", tmp_path / "sharded.jsonl"
    done = run_cli(*_args(student, single, data, tiny_teacher, 4, "--log-jsonl", log_single))
    assert done.returncode == 0, done.stderr
    done = run_torchrun(*_args(student, sharded, data, tiny_teacher, 4, "--log-jsonl", log_sharded))
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.strip().splitlines()) == 1  # only rank 0 prints its summary
    _close(single, sharded)
    a = [json.loads(line) for line in log_single.read_text().splitlines()]
    b = [json.loads(line) for line in log_sharded.read_text().splitlines()]
    assert len(a) == len(b) == 4  # rank 0 alone writes the log
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"] and x["loss"] == pytest.approx(y["loss"], rel=1e-4)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3)

    # 2 processes for 2 steps, 1 process resumes to 3, 2 processes resume to 4: the same as 4 steps in one
    # process. Each rank wrote its own optimizer shard; the optimizer state was never gathered
    done = run_torchrun(*_args(student, resumed, data, tiny_teacher, 2))
    assert done.returncode == 0, done.stderr[-3000:]
    shards = sorted(p.name for p in (resumed / "fdivctl_state" / "optimizer").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    done = run_cli(*_args(student, resumed, data, tiny_teacher, 3, "--resume"))
    assert done.returncode == 0, done.stderr
    assert "torch.distributed is disabled" not in done.stderr
    done = run_torchrun(*_args(student, resumed, data, tiny_teacher, 4, "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    _close(single, resumed)


@pytest.mark.slow  # two processes, 18–32 s on 2 cores: .ci/run's slow pass keeps the default run under 10 minutes
def test_bf16_master_weights_shard_and_resume_across_world_sizes(tmp_path, student, data, tiny_teacher):
    """A bf16 model's fp32 master weights are DTensor shards under FSDP2: each rank saves its own; 2 steps then a
    resume to 4 on 2 processes equal 4 steps at once, bit for bit, and one process resumes them too."""
    whole, resumed, other = tmp_path / "whole", tmp_path / "resumed", tmp_path / "other"
    bf16 = ("--dtype", "bf16")
    done = run_torchrun(*_args(student, whole, data, tiny_teacher, 4, *bf16))
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_torchrun(*_args(student, resumed, data, tiny_teacher, 2, *bf16))
    assert done.returncode == 0, done.stderr[-3000:]
    shards = sorted(p.name for p in (resumed / "fdivctl_state" / "master").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    shutil.copytree(resumed, other)
    done = run_torchrun(*_args(student, resumed, data, tiny_teacher, 4, *bf16, "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_file(resumed / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16
    _close(whole, resumed, atol=0)
    done = run_cli(*_args(student, other, data, tiny_teacher, 3, *bf16, "--resume"))  # the shards, resharded
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (NCCL)")
def test_an_nccl_group_also_reduces_the_loops_cpu_figures():
    """Under --dist-backend nccl the loop's figures and token counts are CPU tensors, which NCCL alone cannot
    reduce (it raised on the first step of every multi-GPU run); one rank, the same collectives as N."""
    import torch.distributed as dist

    from fdivctl.training import distributed

    dist.init_process_group(distributed.group_backend("nccl"), store=dist.HashStore(), rank=0, world_size=1)
    try:
        world = distributed.World(0, 2, 0)  # as if two ranks: the collectives run, the sums are this rank's alone
        assert distributed.mean_figures({"loss": 3.0, "tokens": 5.0}, world) == {"loss": 1.5, "tokens": 5.0}
        assert distributed.sum_over_ranks(7.0, world) == 7.0
        assert distributed.all_finite(torch.ones((), device="cuda"), world)
    finally:
        dist.destroy_process_group()


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tmp_path, student, data, tiny_teacher):
    bad_batch = run_torchrun(*_args(student, tmp_path / "odd", data, tiny_teacher, 1, "--batch-size", 3))
    # torchrun exits 1 when a process fails; each process ends with fdivctl's one line and exit code 2
    assert bad_batch.returncode != 0 and "must be a multiple of the 2 processes" in bad_batch.stderr
    assert "exitcode  : 2" in bad_batch.stderr


@pytest.mark.slow  # two processes, 18–32 s on 2 cores: .ci/run's slow pass keeps the default run under 10 minutes
def test_lora_on_two_processes_equals_one_and_resumes(tmp_path, student, data, tiny_teacher):
    """FSDP2 shards the frozen base weights and the adapters alike; the checkpoint (merged weights + adapter) is
    made from the gathered state, and a resume loads the adapter before sharding."""
    lora = ("--lora-r", 4, "--lora-alpha", 8)
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli(*_args(student, one, data, tiny_teacher, 2, *lora)).returncode == 0
    done = run_torchrun(*_args(student, two, data, tiny_teacher, 2, *lora))
    assert done.returncode == 0, done.stderr[-3000:]
    _close(one, two)
    _close(one / "adapter", two / "adapter", file="adapter_model.safetensors")
    assert run_cli(*_args(student, one, data, tiny_teacher, 3, *lora, "--resume")).returncode == 0
    done = run_torchrun(*_args(student, two, data, tiny_teacher, 3, *lora, "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    _close(one, two)
    assert load_file(one / "model.safetensors").keys() == load_file(student / "model.safetensors").keys()


def test_rollout_and_teacher_logits_take_their_shard_fromrun_torchrun(tmp_path, data, tiny_teacher):
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt_id": [f"q{i}" for i in range(5)],
                             "prompt": ["Compute 1 + 2.", "Compute 3 * 4.", "The answer", "hello", "x"]}), prompts)
    done = run_torchrun("rollout", tiny_teacher, prompts, tmp_path / "r.parquet", "--samples", 3, "--max-new-tokens", 4,
                     "--backend", "hf", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    parts = [tmp_path / f"r-shard-{i}-of-2.parquet" for i in range(2)]
    ids = [set(pq.read_table(p).column("prompt_id").to_pylist()) for p in parts]
    assert ids[0] | ids[1] == {f"q{i}" for i in range(5)} and not ids[0] & ids[1]
    # --samples, not the number of processes (the shard's count once overwrote it)
    assert sum(pq.read_table(p).num_rows for p in parts) == 5 * 3
    assert run_cli("merge", tmp_path / "merged.parquet", *parts).returncode == 0

    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--k", 16, "--max-tokens-per-shard", 30, "--device", "cpu", "--dtype", "fp32"]
    assert run_cli("teacher-logits", tiny_teacher, data, one, *common).returncode == 0
    done = run_torchrun("teacher-logits", tiny_teacher, data, two, *common)
    assert done.returncode == 0, done.stderr[-3000:]
    assert run_cli("teacher-logits", "--verify", two).returncode == 0
    shards = sorted(p.name for p in one.glob("shard-*.safetensors"))
    assert len(shards) > 2 and shards == sorted(p.name for p in two.glob("shard-*.safetensors"))
    for name in shards:
        assert (one / name).read_bytes() == (two / name).read_bytes()


def test_fdpo_on_two_processes_equals_one(tmp_path, student):
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": [f"Compute {i} + {i}." for i in range(8)],
                             "chosen": [f" The answer is {2 * i}." for i in range(8)],
                             "rejected": [f" The answer is {2 * i + 1}." for i in range(8)]}), pairs)
    args = ["train", student, None, "--algo", "fdpo", "--pairs", pairs, "--divergence", "jsd", "--lr", 1e-3,
            "--batch-size", 4, "--max-steps", 2, "--device", "cpu"]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    done = run_cli(*[single if a is None else a for a in args])
    assert done.returncode == 0, done.stderr
    done = run_torchrun(*[sharded if a is None else a for a in args])
    assert done.returncode == 0, done.stderr[-3000:]
    assert (sharded / "fdivctl_run").is_dir()
    # AdamW's first steps move a weight by about lr·sign(g): where g is ~0 up to rounding (seen: 1 of 40960
    # head weights), the order of the ranks' sums can move it by a fraction of lr = 1e-3
    _close(single, sharded, atol=2e-4)


def _single_and_sharded(args: list, tmp_path) -> dict[str, list[dict]]:
    """Run ``fdivctl ARGS`` in one process and under torchrun with 2; ``args`` holds OUT (the third item) and the
    ``--log-jsonl`` path as None, filled here with ``tmp_path/single|sharded[.jsonl]``; returns both logs."""
    logs = {}
    for name, runner in (("single", run_cli), ("sharded", run_torchrun)):
        out, log = tmp_path / name, tmp_path / f"{name}.jsonl"
        done = runner(*[out if a is None and i == 2 else log if a is None else a for i, a in enumerate(args)])
        assert done.returncode == 0, done.stderr[-3000:]
        logs[name] = [json.loads(line) for line in log.read_text().splitlines()]
    return logs


@pytest.mark.parametrize("extra", [[], ["--tis-cap", 2]], ids=["sampler-ratio", "tis"])
def test_staged_grpo_on_two_processes_equals_one(tmp_path, task, scored_rollouts, extra):
    """Each step's responses are split over the ranks; 5 per step with 2 per micro-batch leaves rank 1 one micro-batch
    short, so it runs a zero-weighted one to keep FSDP's collectives paired (with --tis-cap every rank first
    recomputes π_old over all the responses, a forward through the sharded policy)."""
    args = ["train", task / "sft", None, "--rollouts", scored_rollouts, "--divergence", "rkl", "--div-coef", 0.1,
            "--minibatch-size", 5, "--micro-batch-size", 2, "--lr", 1e-3, "--device", "cpu", "--log-jsonl", None,
            *extra]
    runs = _single_and_sharded(args, tmp_path)
    assert len(runs["single"]) == len(runs["sharded"]) == 20
    for x, y in zip(runs["single"], runs["sharded"]):
        assert x["tokens"] == y["tokens"]
        # the single run sums with several threads, the ranks with one each: figures agree to rounding over 20
        # steps (a factor N or a lost micro-batch would be far outside these tolerances)
        for key in ("loss", "pg_loss", "entropy", "divergence", "clip_frac"):
            assert y[key] == pytest.approx(x[key], rel=1e-3, abs=1e-5), key
    _close(tmp_path / "single", tmp_path / "sharded")  # seen: 2.3e-6 apart at most


@pytest.mark.slow  # two processes, 18–32 s on 2 cores: .ci/run's slow pass keeps the default run under 10 minutes
def test_online_grpo_on_two_processes_samples_the_gathered_weights(tmp_path, task):
    """Online under torchrun: rank 0 samples from an unsharded copy that is loaded with the weights gathered from
    the FSDP shards after each update; the run matches one process's."""
    args = ["train", task / "sft", None, "--prompts", task / "data" / "prompts.parquet", "--verifier", "regex",
            "--pattern", r"^\s*[1-3]\+", "--max-new-tokens", 10, "--group-size", 4, "--prompts-per-iteration", 4,
            "--iterations", 3, "--lr", 1e-3, "--device", "cpu", "--log-jsonl", None]
    logs = _single_and_sharded(args, tmp_path)
    # the sampler's log-probs are the trainer's: its copy was synced before iterations 2 and 3
    assert len(logs["sharded"]) == 3 and all(r["logprob_gap"] < 1e-4 for r in logs["sharded"]), logs["sharded"]
    for i in (1, 2, 3):
        name = f"fdivctl_run/iter-{i:04d}.scored.parquet"
        a, b = pq.read_table(tmp_path / "single" / name), pq.read_table(tmp_path / "sharded" / name)
        assert a.column("completion_token_ids").to_pylist() == b.column("completion_token_ids").to_pylist(), i
    _close(tmp_path / "single", tmp_path / "sharded")
    # 2 processes for iteration 1, then 1 process resumes to 3 (optimizer state and RL state keyed by name)
    part = tmp_path / "part"
    first = [part if a is None and i == 2 else tmp_path / "part.jsonl" if a is None else a for i, a in enumerate(args)]
    done = run_torchrun(*[1 if a == 3 and first[i - 1] == "--iterations" else a for i, a in enumerate(first)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert len((tmp_path / "part.jsonl").read_text().splitlines()) == 1
    assert run_cli(*first, "--resume").returncode == 0
    assert len((tmp_path / "part.jsonl").read_text().splitlines()) == 3
    _close(tmp_path / "single", part)


def test_on_policy_distill_on_two_processes_equals_one(tmp_path, student, tiny_teacher):
    """Rank 0 samples each whole micro-batch as one process would and every rank distills its own rows."""
    prompts = tmp_path / "prompts.parquet"
    texts = ["2 digits sum 9:", "3 digits sum 14:", "the cat", "a b c", "hello", "7 + 8 =", "Compute 1 + 2.", "x y"]
    pq.write_table(pa.table({"prompt_id": [f"q{i}" for i in range(8)], "prompt": texts}), prompts)
    args = ["distill", student, None, "--on-policy", "--prompts", prompts, "--teacher", tiny_teacher,
            "--samples-per-prompt", 2, "--max-new-tokens", 6, "--batch-size", 4, "--max-steps", 3, "--lr", 1e-3,
            "--device", "cpu", "--log-jsonl", None]
    logs = _single_and_sharded(args, tmp_path)
    assert len(logs["single"]) == len(logs["sharded"]) == 3
    for x, y in zip(logs["single"], logs["sharded"]):
        assert x["tokens"] == y["tokens"] and x["response_length"] == pytest.approx(y["response_length"])
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)  # the mean over both ranks' unequal token counts
    # seen: 1 of 32768 weights 2.1e-5 apart (AdamW's lr·sign(g) where g is ~0 up to the ranks' summation order)
    _close(tmp_path / "single", tmp_path / "sharded", atol=1e-4)


def test_online_lora_on_two_processes_samples_the_merged_weights(tmp_path, task):
    """Under torchrun with LoRA, rank 0's sampler is loaded with the gathered weights, adapters merged: the
    sampler's log-probs of iteration 2 are the trainer's (0.29 apart when the sync is skipped)."""
    log = tmp_path / "log.jsonl"
    done = run_torchrun("train", task / "sft", tmp_path / "out", "--prompts", task / "data" / "prompts.parquet",
                        "--verifier", "regex", "--pattern", r"^\s*[1-3]\+", "--max-new-tokens", 10, "--group-size", 4,
                        "--prompts-per-iteration", 4, "--iterations", 2, "--lr", 5e-2, "--lora-r", 4, "--device", "cpu",
                        "--log-jsonl", log)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 2 and all(r["logprob_gap"] < 1e-4 for r in records), records
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_dph_partition_on_two_processes(tmp_path, task):
    """Each rank pre-samples every other prompt; rank 0 joins, scores and splits, and writes the partition."""
    from artifacts import check_dph_partition, dph_prompts

    prompts = dph_prompts(task, tmp_path / "prompts.parquet")
    done = run_torchrun("train", task / "sft", tmp_path / "partition", "--algo", "dph", "--partition", "--prompts",
                        prompts, "--verifier", "regex", "--k", 4, "--max-new-tokens", 10, "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.strip().splitlines()) == 1  # rank 0's summary
    check_dph_partition(prompts, tmp_path / "partition", k=4)
    assert not list((tmp_path / "partition").glob("*shard*"))
