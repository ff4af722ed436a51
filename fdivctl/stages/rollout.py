"""``rollout``: sample completions for a prompts table, streaming, resumable, shardable.

Prompts are read in batches (memory does not grow with the file).  With
``shard = (i, n)`` this process takes every n-th prompt, starting at the i-th.
Each batch's rows are written to ``OUT.parts/part-NNNNNN.parquet`` (atomic);
``resume`` skips parts already written; at the end the parts are joined into
``OUT`` (atomic) and removed.  A batch's seed is ``seed + batch number``, so a
resumed run samples exactly what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fdivctl.errors import UserError
from fdivctl.generation.hf import HFGenerator
from fdivctl.generation.sampling import SamplingOptions, encode_prompts
from fdivctl.generation.vllm_backend import VLLMGenerator, vllm_available
from fdivctl.io.atomic import atomic_path, check_output_file
from fdivctl.io.checkpoints import load_causal_lm, load_tokenizer, model_limits
from fdivctl.io.hashing import model_hash, tokenizer_hash
from fdivctl.io.parts import open_parts, part_path
from fdivctl.io.prompts import encode_prompt
from fdivctl.io.tables import open_parquet, provenance, read_table, require_prompt_ids, write_tables

BACKENDS = ("auto", "hf", "vllm")
GENERATED = {
    "prompt_id": pa.string(),
    "sample_idx": pa.int64(),
    "prompt": pa.string(),
    "prompt_token_ids": pa.list_(pa.int32()),
    "completion": pa.string(),
    "completion_token_ids": pa.list_(pa.int32()),
    "completion_logprobs": pa.list_(pa.float32()),
    "finish_reason": pa.string(),
}


@dataclass
class RolloutOptions:
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    backend: str = "auto"
    batch_size: int = 16
    dtype: str = "auto"
    device: str = "auto"
    chat: bool = False
    shard: tuple[int, int] = (0, 1)
    resume: bool = False
    tensor_parallel_size: int = 1


def resolve_backend(backend: str, device: str) -> str:
    """``auto`` → vllm when it is importable and the run is on CUDA, else hf.

    On the CPU vLLM is slower than ``generate`` at small sizes (PLATFORM.md);
    ask for it explicitly there.
    """
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "auto":
        on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        return "vllm" if on_cuda and vllm_available() else "hf"
    if backend == "vllm" and not vllm_available():
        raise UserError("--backend vllm: vLLM is not installed (pip install 'fdivctl[vllm]')")
    return backend


def shard_path(out: Path, index: int, count: int) -> Path:
    """Where shard ``index`` of ``count`` of a run writing ``out`` puts its part: ``OUT-shard-i-of-n.parquet``
    (``fdivctl merge`` joins them)."""
    return out.with_name(f"{out.stem}-shard-{index}-of-{count}{out.suffix}")


def _check_prompts(path: Path) -> pq.ParquetFile:
    file = open_parquet(path)
    names = file.schema_arrow.names
    if "prompt_id" not in names or ("prompt" not in names and "messages" not in names):
        raise UserError(f"{path}: needs columns prompt_id and prompt (or messages); it has {', '.join(names)}")
    if file.metadata.num_rows == 0:
        raise UserError(f"{path}: the table is empty")
    require_prompt_ids(path, file.read(columns=["prompt_id"]).column(0))
    clash = [c for c in GENERATED if c not in ("prompt_id", "prompt") and c in names]
    if clash:
        raise UserError(f"{path}: column {clash[0]!r} would be overwritten by rollout's output")
    return file


def _check_prompt_lengths(file: pq.ParquetFile, tokenizer, model_dir, opts: RolloutOptions) -> None:
    """Refuse, before anything is sampled, a prompt of this shard with no tokens or no room in the model's context."""
    context = model_limits((model_dir, "model")).context
    for _, batch in _batches(file, opts.batch_size, opts.shard):
        encode_prompts(tokenizer, batch.to_pylist(), opts.chat, context, f"model {model_dir}")


def _batches(file: pq.ParquetFile, batch_size: int, shard: tuple[int, int]):
    """(batch number, pyarrow table of this shard's prompts), streamed."""
    i, n = shard
    ordinal, number, pending = 0, 0, []
    for record_batch in file.iter_batches(batch_size=1024):
        table = pa.Table.from_batches([record_batch])
        keep = [r for r in range(table.num_rows) if (ordinal + r) % n == i]
        ordinal += table.num_rows
        if keep:
            pending.append(table.take(keep))
        while pending and sum(t.num_rows for t in pending) >= batch_size:
            merged = pa.concat_tables(pending)
            yield number, merged.slice(0, batch_size)
            number += 1
            rest = merged.slice(batch_size)
            pending = [rest] if rest.num_rows else []
    if pending:
        yield number, pa.concat_tables(pending)


def run_rollout(
    model_dir: str | Path,
    prompts: str | Path,
    out: str | Path,
    opts: RolloutOptions,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict:
    """Write ``out``; ``on_batch(samples, tokens)`` after each batch.  Returns a summary."""
    opts.sampling.check()
    if opts.batch_size < 1 or opts.tensor_parallel_size < 1:
        raise UserError("--batch-size and --tensor-parallel-size must be ≥ 1")
    backend = resolve_backend(opts.backend, opts.device)
    prompts, out = Path(prompts), check_output_file(out)
    file = _check_prompts(prompts)
    tokenizer = load_tokenizer(model_dir, "model")
    _check_prompt_lengths(file, tokenizer, model_dir, opts)
    record = {
        "model": str(Path(model_dir).resolve()),
        "model_hash": model_hash(model_dir),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "sampling": opts.sampling.as_record(),
        "backend": backend,
        "shard": list(opts.shard),
        "batch_size": opts.batch_size,
        "chat": opts.chat,
        "source": str(prompts.resolve()),
    }
    with open_parts(out, record, opts.resume) as parts:
        summary = _generate_parts(model_dir, tokenizer, file, parts, opts, backend, on_batch)
        _join_parts(parts, out, record)
    return summary


def _generate_parts(model_dir, tokenizer, file: pq.ParquetFile, parts: Path, opts: RolloutOptions, backend: str,
                    on_batch) -> dict:
    """Sample every batch of this shard that has no part file yet into ``parts``; returns the counts."""
    if backend == "vllm":
        generator = VLLMGenerator(model_dir, tokenizer, opts.dtype, opts.tensor_parallel_size)
    else:
        generator = HFGenerator(load_causal_lm(model_dir, opts.dtype, opts.device, "model"), tokenizer)
    samples = tokens = 0
    for number, batch in _batches(file, opts.batch_size, opts.shard):
        part = part_path(parts, number)
        if part.exists():
            continue
        rows = batch.to_pylist()
        encoded = [encode_prompt(tokenizer, row, opts.chat) for row in rows]
        results = generator.generate([ids for _, ids in encoded], opts.sampling, opts.sampling.seed + number)
        table = rollout_rows(batch, rows, encoded, results)
        with atomic_path(part) as tmp:
            pq.write_table(table, tmp)
        batch_tokens = sum(len(c.token_ids) for per_prompt in results for c in per_prompt)
        samples += table.num_rows
        tokens += batch_tokens
        if on_batch:
            on_batch(table.num_rows, batch_tokens)
    return {"samples_generated": samples, "tokens_generated": tokens, "backend": backend}


def rollout_rows(batch: pa.Table, rows, encoded, results) -> pa.Table:
    """The rollout table of one batch of prompts: one row per completion, the prompts' columns carried."""
    n = len(results[0])
    take = [i for i in range(len(rows)) for _ in range(n)]
    columns = {
        "prompt_id": [str(rows[i]["prompt_id"]) for i in take],
        "sample_idx": [s for _ in rows for s in range(n)],
        "prompt": [encoded[i][0] for i in take],
        "prompt_token_ids": [encoded[i][1] for i in take],
        "completion": [c.text for per in results for c in per],
        "completion_token_ids": [c.token_ids for per in results for c in per],
        "completion_logprobs": [c.logprobs for per in results for c in per],
        "finish_reason": [c.finish_reason for per in results for c in per],
    }
    table = pa.table({k: pa.array(v, GENERATED[k]) for k, v in columns.items()})
    carried = batch.take(take)
    for name in carried.column_names:
        if name not in GENERATED:
            table = table.append_column(carried.schema.field(name), carried.column(name))
    return table


def _join_parts(parts: Path, out: Path, record: dict) -> None:
    files = sorted(parts.glob("part-*.parquet"))
    if not files:
        raise UserError("this shard received no prompts (more shards than prompts?)")
    write_tables(out, (pq.read_table(f) for f in files), record)


def merge_rollouts(inputs: list[Path], out: Path, partial: bool = False) -> tuple[int, list[str]]:
    """Join shard outputs of one rollout (or score) run, streaming; refuse files of different runs or shared rows,
    and a set of shards that is not the whole run (their provenance's ``shard`` i/n: every i of one n) unless
    ``partial``.  Returns the rows written and the shards missing (``"i/n"``; with ``partial`` only)."""
    if not inputs:
        raise UserError("merge needs at least one input file")
    check_output_file(out)
    first, keys, n_keys, shards = None, set(), 0, {}
    for path in inputs:
        key_table = read_table(path, columns=["prompt_id", "sample_idx"])
        record = provenance(path)
        record.pop("versions", None)  # the libraries of the process that wrote the shard: the merge records its own
        if "shard" in record:
            shards[path] = tuple(record.pop("shard"))
        if first is None:
            first = record
        elif record != first:
            raise UserError(f"{path}: made by another run than {inputs[0]} (model, sampling or source differ)")
        keys.update(zip(key_table.column("prompt_id").to_pylist(), key_table.column("sample_idx").to_pylist()))
        n_keys += key_table.num_rows
    missing = _missing_shards(shards)
    if len(keys) != n_keys:
        raise UserError("the inputs overlap: some (prompt_id, sample_idx) appear twice")
    if missing and not partial:
        raise UserError(f"shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} of the run "
                        f"{'are' if len(missing) > 1 else 'is'} not among the inputs: give every shard, or pass "
                        "--partial to merge what is there")
    rows = write_tables(out, (read_table(p) for p in inputs), {**first, "merged_from": [str(p) for p in inputs],
                                                                **({"missing_shards": missing} if missing else {})})
    return rows, missing


def _missing_shards(shards: dict[Path, tuple[int, int]]) -> list[str]:
    """The shards ``i/n`` of the run that no input holds (one n for every input; a 0/1 file is a whole run)."""
    counts = {n for _, n in shards.values()}
    if len(counts) > 1:
        raise UserError("the inputs were sharded differently (" + ", ".join(
            f"{path}: {i}/{n}" for path, (i, n) in shards.items()) + "): they are not shards of one run")
    if not counts:
        return []
    (n,) = counts
    held = {i for i, _ in shards.values()}
    return [f"{i}/{n}" for i in range(n) if i not in held]
