"""Logit-store cost: bytes per token and write throughput vs a bare teacher forward.

For each k in ``--ks`` and storage dtype in ``--dtypes`` the real
``teacher-logits`` stage writes a store for the same sequences; beside it, in
the same run, a bare teacher forward (``model(input_ids).logits``, batches of
the same size in the file's order, each padded to its longest, the same model
load) goes over the same tokens.  ``--length-spread`` gives the completions
mixed lengths, where the store's batching by length pays.  Prints one JSON
object per (k, dtype) with ``tokens`` (prompt + completion tokens through the
teacher), ``scored_tokens``, ``store_tokens_per_s``, ``bare_tokens_per_s``,
``throughput_ratio`` (store/bare = bare_s/store_s; target ≥ 0.8),
``bytes_per_token`` (all shard files / scored tokens) and its target
``6·k + 16``.  Both timings include loading the model; the store's also
includes hashing the source and teacher and writing the files, which
``store_phases_s`` splits: ``setup`` (tokenizer, sequences, hashes, plan),
``score`` (model load and every batch), ``write`` (after the last batch:
the shard's device→host copy, checksum, files and manifest).
``store_batch_ms`` / ``bare_batch_ms`` give the time between consecutive
batch ends (device time on CUDA): a batch far slower than its neighbours pays a
one-time cost for its shape; ``--repeats 2`` runs each store and bare forward
again in the same process (``"repeat": 1``), where every shape has been met.

    python bench/teacher_logits.py --quick                 # CPU, small model
    python bench/teacher_logits.py                         # CPU, V=32768
    python bench/teacher_logits.py --length-spread 0.9     # CPU, completions of 23..224 tokens
    python bench/teacher_logits.py --device cuda --hidden 896 --layers 24 --vocab 151936
    python bench/teacher_logits.py --device cuda ... --profile profile.txt   # + where the store's time goes
    python bench/teacher_logits.py --device cuda ... --length-spread 0.9 --ks 64 --repeats 2

``--profile FILE`` writes, after the timed runs, the torch.profiler tables (top
operators and kernels by self device time) of one more store run (the first k
and dtype) and one more bare forward.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

from fdivctl import tiny
from fdivctl.io.checkpoints import load_causal_lm
from fdivctl.io.tables import write_table
from fdivctl.stages.teacher_logits import TeacherLogitsOptions, run_teacher_logits
from profiling import profile_table  # bench/profiling.py, beside this script


def make_sequences(path: Path, vocab: int, n: int, prompt_len: int, completion_len: int,
                   spread: float = 0.0) -> list[list[int]]:
    """Write ``n`` random sequences; with ``spread`` s > 0 each completion's length is drawn uniformly from
    ((1 − s)·completion_len, completion_len].  Returns each row's prompt + completion ids."""
    g = torch.Generator().manual_seed(0)
    low = max(1, round(completion_len * (1 - spread)))
    lengths = torch.randint(low, completion_len + 1, (n,), generator=g).tolist() if spread else [completion_len] * n
    prompts = torch.randint(3, vocab, (n, prompt_len), generator=g).tolist()
    completions = [torch.randint(3, vocab, (m,), generator=g).tolist() for m in lengths]
    table = pa.table(
        {
            "prompt_id": [f"p{i}" for i in range(n)],
            "sample_idx": pa.array([0] * n, pa.int64()),
            "prompt_token_ids": pa.array(prompts, pa.list_(pa.int32())),
            "completion_token_ids": pa.array(completions, pa.list_(pa.int32())),
        }
    )
    write_table(path, table, {})
    return [p + c for p, c in zip(prompts, completions)]


@torch.no_grad()
def bare_forward(model_dir: Path, sequences: list[list[int]], batch_size: int, device: str,
                 model_dtype: str) -> tuple[float, list[float]]:
    """Seconds to load the teacher and run ``model(input_ids).logits`` over ``sequences`` in the file's order,
    each batch right-padded to its longest (what a plain scoring loop does), and the milliseconds of each batch
    after the first (:func:`batch_ms`)."""
    start = time.perf_counter()
    model = load_causal_lm(model_dir, model_dtype, device, "teacher")
    ends = []
    for b in range(0, len(sequences), batch_size):
        rows = sequences[b : b + batch_size]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=model.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=model.device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits.float().sum().item()  # the logits are used, and the device is synchronized
        ends.append(time.perf_counter())
    return time.perf_counter() - start, batch_ms(ends)


def batch_ms(ends: list) -> list[float]:
    """Milliseconds between consecutive batch ends (``time.perf_counter()`` values, or CUDA events recorded with
    timing): each batch after the first, including any time the device waited for the host before it.  A batch
    much slower than its neighbours of the same shape is paying a one-time cost (a compile, a kernel plan)."""
    if ends and isinstance(ends[0], torch.cuda.Event):
        ends[-1].synchronize()
        return [round(a.elapsed_time(b), 2) for a, b in zip(ends, ends[1:])]
    return [round(1000 * (b - a), 2) for a, b in zip(ends, ends[1:])]


def _fresh_memory(device: str) -> None:
    """Start a timed run as a fresh process (a real ``teacher-logits`` run) would: the previous run's model and
    tensors collected and, on CUDA, the caching allocator's blocks given back, the bare forward's ``[16, L, V]``
    logits among them (several GB).  Without it the second store of a process (k = 64) took 0.28–0.29 s longer
    up to the end of its first batch than the first and third (H100 and H200, ``bench/results``); the inherited
    blocks are one suspect, not yet confirmed on a device."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _store_options(args, k: int, dtype: str) -> TeacherLogitsOptions:
    """The stage's options for a store at ``k`` and ``dtype``, the rest from the command line."""
    return TeacherLogitsOptions(k=k, dtype=dtype, batch_size=args.batch_size, device=args.device,
                                model_dtype=args.model_dtype, max_tokens_per_shard=args.max_tokens_per_shard)


class Phases:
    """Where the store's time goes: ``setup`` (start → plan), ``score`` (plan → the last batch's work done),
    ``write`` (the rest). On CUDA the batches are timed with events, so marking them does not synchronize
    the device (the stage overlaps preparing a batch with the device's work on the previous one)."""

    def __init__(self, device: str):
        self.start = time.perf_counter()
        self.planned = self.start
        self.cuda = device.startswith("cuda")
        self.plan_event = self.last_event = None
        self.last_batch = self.start
        self.ends: list = []  # each batch's end: CUDA events, or host times

    def plan(self, _tokens: int) -> None:
        self.planned = time.perf_counter()
        if self.cuda:
            self.plan_event = torch.cuda.Event(enable_timing=True)
            self.plan_event.record()

    def batch(self, _tokens: int) -> None:
        self.last_batch = time.perf_counter()
        if self.cuda:
            self.last_event = torch.cuda.Event(enable_timing=True)
            self.last_event.record()
        self.ends.append(self.last_event if self.cuda else self.last_batch)

    def seconds(self) -> dict[str, float]:
        total = time.perf_counter() - self.start
        setup = self.planned - self.start
        if self.cuda and self.last_event is not None:
            self.last_event.synchronize()
            score = self.plan_event.elapsed_time(self.last_event) / 1000
        else:
            score = self.last_batch - self.planned
        return {"setup": setup, "score": score, "write": total - setup - score}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--quick", action="store_true", help="a small model and few tokens, under a minute")
    parser.add_argument("--ks", default="16,64,256", help="the store's k values, one store (and JSON line) each")
    parser.add_argument("--dtypes", default="bf16,fp32", help="the stored log-probs' dtypes, crossed with --ks")
    parser.add_argument("--hidden", type=int, default=256, help="the random teacher's hidden size")
    parser.add_argument("--layers", type=int, default=4, help="the random teacher's decoder layers")
    parser.add_argument("--vocab", type=int, default=32768, help="the random teacher's vocabulary size")
    parser.add_argument("--sequences", type=int, default=64, help="sequences scored")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per sequence (not scored)")
    parser.add_argument("--completion-len", type=int, default=224, help="completion tokens per sequence (scored)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per teacher forward, both sides")
    parser.add_argument("--length-spread", type=float, default=0.0,
                        help="s in [0, 1): completion lengths uniform in ((1 − s)·L, L] (0: all L)")
    parser.add_argument("--model-dtype", default="auto", help="the teacher's dtype: auto (fp32 on the CPU), bf16, "
                        "fp16 or fp32")
    parser.add_argument("--max-tokens-per-shard", type=int, default=None,
                        help="the stage's default (about 64 MiB per shard) when not given; the background write "
                        "of one shard overlaps scoring the next")
    parser.add_argument("--repeats", type=int, default=1,
                        help="stores (and bare forwards) per k and dtype, one JSON line each (\"repeat\": 0, 1, …) "
                        "in one process: a later repeat meets every batch shape a second time")
    parser.add_argument("--profile", default=None, help="write the torch.profiler tables of one more store run "
                        "(first k and dtype) and one more bare forward to this file, after the timed runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab, args.sequences, args.completion_len = 8192, 32, 96
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = tiny.train_tokenizer(tmp / "tok")
        model_dir = tmp / "teacher"
        tiny.make_model(model_dir, tokenizer, hidden=args.hidden, layers=args.layers, vocab_size=args.vocab,
                        max_positions=max(512, args.prompt_len + args.completion_len))  # the teacher's context fits
        seqs = tmp / "seqs.parquet"
        sequences = make_sequences(seqs, args.vocab, args.sequences, args.prompt_len, args.completion_len,
                                   args.length_spread)
        ks, dtypes = [int(x) for x in args.ks.split(",")], args.dtypes.split(",")
        bare_forward(model_dir, sequences[: args.batch_size], args.batch_size, args.device, args.model_dtype)  # warm-up
        # and a store over the first batch's rows: Triton compiles the summary's kernels once per machine (a run
        # pays it once, then they come from its cache), not in the first k's figure
        warm = tmp / "warm.parquet"
        make_sequences(warm, args.vocab, args.batch_size, args.prompt_len, args.completion_len, args.length_spread)
        for k in ks:
            run_teacher_logits(model_dir, warm, tmp / f"warm-{k}", _store_options(args, k, dtypes[0]))
        for k, dtype, repeat in itertools.product(ks, dtypes, range(args.repeats)):
            out = tmp / f"store-{k}-{dtype}-{repeat}"
            opts = _store_options(args, k, dtype)
            _fresh_memory(args.device)
            phases = Phases(args.device)
            summary = run_teacher_logits(model_dir, seqs, out, opts, on_tokens=phases.batch, on_plan=phases.plan)
            store_s = time.perf_counter() - phases.start
            store_phases_s = phases.seconds()
            _fresh_memory(args.device)
            bare_s, bare_batch_ms = bare_forward(model_dir, sequences, args.batch_size, args.device,
                                                 args.model_dtype)
            scored = summary["tokens"]
            tokens = sum(map(len, sequences))
            shard_bytes = sum(p.stat().st_size for p in out.glob("shard-*.safetensors"))
            print(json.dumps({
                "k": k,
                "dtype": dtype,
                "repeat": repeat,
                "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
                "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab},
                "length_spread": args.length_spread,
                "tokens": tokens,
                "scored_tokens": scored,
                "store_s": store_s,
                "store_phases_s": store_phases_s,
                "shards": summary["shards_written"],
                "bare_s": bare_s,
                "store_tokens_per_s": tokens / store_s,
                "bare_tokens_per_s": tokens / bare_s,
                "throughput_ratio": bare_s / store_s,
                "bytes_per_token": shard_bytes / scored,
                "bytes_per_token_target": 6 * k + 16,
                "store_batch_ms": batch_ms(phases.ends),
                "bare_batch_ms": bare_batch_ms,
            }), flush=True)
        if args.profile:
            opts = _store_options(args, ks[0], dtypes[0])
            device = torch.device("cuda" if args.device.startswith("cuda") else args.device)
            store = profile_table(lambda: run_teacher_logits(model_dir, seqs, tmp / "store-profiled", opts), device)
            bare = profile_table(
                lambda: bare_forward(model_dir, sequences, args.batch_size, args.device, args.model_dtype), device
            )
            tables = f"== store, k {opts.k}, {opts.dtype} ==\n{store}\n\n== bare forward ==\n{bare}\n"
            Path(args.profile).write_text(tables)


if __name__ == "__main__":
    main()
