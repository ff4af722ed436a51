"""``teacher-logits``: score sequences under a teacher once and cache its top-k distributions.

For every scored token ``y_t`` (completion tokens; with ``include_prompt``
also prompt tokens after the first) the teacher, teacher-forced on the
sequence, gives ``p_t = softmax(logits_{t−1} / T)``; the store keeps its
top-k ids and log-probs, ``log(1 − Σ top-k p_t)``, and ``log p_t(y_t)``
(:func:`fdivctl.engine.topk.head_topk`).  The head is applied to the
final hidden states in chunks, so ``[tokens, V]`` logits never exist.

Work is cut into shards by a deterministic plan
(:func:`~fdivctl.io.logit_store.plan_shards`, whose cuts fall between whole
batches), and batches never cross a shard, so a shard's bytes do not depend
on which process wrote it or whether the run was interrupted.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from fdivctl.engine.topk import head_topk
from fdivctl.errors import UserError
from fdivctl.io.checkpoints import load_causal_lm, load_tokenizer, model_limits
from fdivctl.io.hashing import file_sha256, model_hash, token_digest, tokenizer_hash
from fdivctl.io.lm_head import LMHead
from fdivctl.io.logit_store import (STORE_DTYPES, TENSORS, StoreWriter, default_shard_tokens, resumable_plan,
                                    shard_layout)
from fdivctl.io.sequences import Sequences, check_max_length, load_sequences


@dataclass
class TeacherLogitsOptions:
    k: int = 64
    temperature: float = 1.0
    dtype: str = "bf16"
    batch_size: int = 8
    max_tokens_per_shard: int | None = None  # None: default_shard_tokens (about 64 MiB per shard file)
    shard: tuple[int, int] = (0, 1)
    include_prompt: bool = False
    chat: bool = False  # text tables: prompts through the chat template (recorded; distill --chat must agree)
    max_length: int | None = None  # sequences cut to this many tokens (recorded; distill --max-length must agree)
    device: str = "auto"
    model_dtype: str = "auto"
    allow_tokenizer_mismatch: bool = False

    def check(self) -> None:
        if self.k < 1:
            raise UserError(f"--k must be ≥ 1, got {self.k}")
        if not self.temperature > 0:
            raise UserError(f"--temperature must be > 0, got {self.temperature}")
        if self.dtype not in STORE_DTYPES:
            raise UserError(f"--dtype {self.dtype!r}; valid: {', '.join(STORE_DTYPES)}")
        check_max_length(self.max_length)
        if self.batch_size < 1 or (self.max_tokens_per_shard is not None and self.max_tokens_per_shard < 1):
            raise UserError("--batch-size and --max-tokens-per-shard must be ≥ 1")
        i, n = self.shard
        if not 0 <= i < n:
            raise UserError(f"--shard {i}/{n}: need 0 ≤ i < n")


@torch.no_grad()
def _score_rows(lm: LMHead, seqs: Sequences, rows: list[int], opts: TeacherLogitsOptions, pad_id: int):
    """Top-k summaries for the scored tokens of ``rows``, concatenated in row order."""
    batch = seqs.batch(rows, pad_id, opts.include_prompt, device=lm.weight.device)
    token_ids = batch["token"]
    summary = head_topk(lm.hidden(batch), lm.weight, opts.k, token_ids, bias=lm.bias, temperature=opts.temperature,
                        softcap=lm.softcap)
    return summary, token_ids


def run_teacher_logits(
    teacher: str | Path,
    sequences: str | Path,
    out_dir: str | Path,
    opts: TeacherLogitsOptions,
    on_tokens: Callable[[int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
) -> dict:
    """Fill the store at ``out_dir`` with this process's shards; finalize it when all are done.

    ``on_plan(tokens_to_do)`` is called once before scoring, ``on_tokens(n)``
    after each batch.  Returns a summary: shards written and skipped, tokens,
    and whether the store is complete.
    """
    opts.check()
    tokenizer = load_tokenizer(teacher, "teacher")
    tok_hash = tokenizer_hash(tokenizer)
    seqs = load_sequences(sequences, tokenizer, opts.chat, opts.max_length)
    seqs.check_tokenizer(sequences, tok_hash, f"teacher {teacher}", opts.allow_tokenizer_mismatch)
    counts = seqs.check_scorable(sequences, opts.include_prompt)
    limits = model_limits((teacher, "teacher"))
    seqs.check_fits(sequences, limits)
    shard_tokens = opts.max_tokens_per_shard or default_shard_tokens(out_dir, opts.k, opts.dtype)
    plan = resumable_plan(out_dir, counts, shard_tokens, opts.batch_size)
    config_vocab = limits.vocab_size
    settings = {
        "teacher": str(Path(teacher).resolve()),
        "teacher_hash": model_hash(teacher),
        "tokenizer_hash": tok_hash,
        "vocab_size": config_vocab,
        "k": opts.k,
        "temperature": opts.temperature,
        "dtype": opts.dtype,
        "include_prompt": opts.include_prompt,
        "chat": opts.chat,
        "max_length": opts.max_length,
        "batch_size": opts.batch_size,
        "max_tokens_per_shard": shard_tokens,
        "source": str(Path(sequences).resolve()),
        "source_sha256": file_sha256(sequences),
        "source_rows": len(seqs),
        "n_tokens": int(sum(counts)),
        "shards": plan,
    }
    if opts.k > config_vocab:
        raise UserError(f"--k {opts.k} exceeds the teacher's vocabulary size {config_vocab}")
    writer = StoreWriter(out_dir, settings)
    mine = [i for i in range(len(plan)) if i % opts.shard[1] == opts.shard[0]]
    todo = [i for i in mine if not writer.is_done(i)]
    if on_plan:
        on_plan(sum(plan[i]["n_tokens"] for i in todo))
    if todo:
        model = load_causal_lm(teacher, opts.model_dtype, opts.device, "teacher")
        lm = LMHead.of(model, f"teacher {teacher}")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        store_dtype = STORE_DTYPES[opts.dtype]
        if lm.weight.device.type == "cuda":
            _reserve_pinned_memory(max(plan[i]["n_tokens"] for i in todo), opts.k, store_dtype)
        # shard i's file is written and checksummed in the background while shard i+1 is scored; one in flight,
        # so host memory holds at most two shards (an interrupted write leaves no sidecar: resume redoes it)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as background:
            writing = None
            for i in todo:
                tensors, spans, scored = _score_shard(writer.shards[i]["rows"], lm, seqs, opts, pad_id, store_dtype,
                                                      counts, on_tokens)
                if writing:
                    writing.result()
                writing = background.submit(_write_shard, writer, i, tensors, spans, scored)
            writing.result()
    complete = writer.finalize()
    return {
        "shards_written": len(todo),
        "shards_skipped": len(mine) - len(todo),
        "shards_total": len(plan),
        "tokens": int(sum(plan[i]["n_tokens"] for i in todo)),
        "complete": complete,
        **({} if opts.max_length is None else seqs.cut_counts()),
    }


def _reserve_pinned_memory(n_tokens: int, k: int, store_dtype: torch.dtype) -> None:
    """Allocate and free pinned host tensors of a shard of ``n_tokens`` tokens before the first batch, so that
    torch's caching host allocator holds the blocks :func:`_write_shard`'s copies take: a copy that had to
    allocate pinned memory (``cudaHostAlloc``) while a batch ran slowed that batch by 17–70 ms, once a size in a
    process (the first batch of a later shard; ``bench/results/teacher_logits_cuda_h200_pinned.jsonl``).
    """
    for shape, dtype in shard_layout(n_tokens, k, store_dtype).values():
        torch.empty(shape, dtype=dtype, pin_memory=True)


def _write_shard(writer: StoreWriter, index: int, tensors: dict[str, torch.Tensor], spans: list[dict],
                 scored: torch.cuda.Event | None) -> None:
    """Bring shard ``index``'s tensors to the host and write them; runs on the writer thread.

    On CUDA the device→host copy runs on a stream of its own once ``scored`` (recorded after the shard's last
    batch) has passed, so it overlaps the next shard's batches instead of stalling them, and the main thread
    never waits for it (a copy on the main thread would drain the device's queue once per shard).  The copy goes
    into pinned host memory (``non_blocking``: a DMA transfer), not pageable memory: while it went to pageable
    memory (``.cpu()``, which the driver stages through a buffer of its own), the batch the main thread ran
    meanwhile took 35–50 ms longer, once per shard (k = 64 and 256 in ``bench/results/``'s
    ``teacher_logits_cuda_h100_onepass.jsonl`` and ``…_h200_flash.jsonl``).
    """
    if scored is not None:
        copying = torch.cuda.Stream(tensors["ids"].device)  # on the tensors' device (--device cuda:N too)
        copying.wait_event(scored)
        with torch.cuda.stream(copying):
            host = {name: t.to("cpu", non_blocking=True) for name, t in tensors.items()}  # pinned, asynchronous
        copying.synchronize()  # before the device tensors (referenced until then) can be freed and reused
        tensors = host
    writer.write_shard(index, tensors, spans)


def _score_shard(shard_rows, lm, seqs, opts, pad_id, store_dtype, counts, on_tokens):
    """Score one shard's rows batch by batch: its tensors (on the model's device), one span per row, and on
    CUDA an event recorded after its last batch (else None).

    The rows are batched longest first, so a batch pads its sequences to little more than their own length (in
    the file's order a batch of mixed lengths is padded to its longest); the index keeps the file's order, each
    span pointing where its row lies in the shard.  Results stay on the device until the shard is done (the
    writer thread copies them out), so no copy waits on a batch.  A batch still reads the device twice from the
    host: transformers' packed-sequence check at the start of its forward, and ``head_topk``'s check for rows
    to redo exactly; each waits for the work queued before it.
    """
    start_row, end_row = shard_rows
    pieces: dict[str, list[torch.Tensor]] = {name: [] for name in TENSORS}
    spans, offset = [], 0
    for rows in seqs.by_length(range(start_row, end_row), opts.batch_size):
        summary, token_ids = _score_rows(lm, seqs, rows, opts, pad_id)
        pieces["ids"].append(summary.ids)
        pieces["logprobs"].append(summary.logprobs.to(store_dtype))
        pieces["log_tail"].append(summary.log_tail)
        pieces["token_logprob"].append(summary.token_logprob)
        pieces["token_ids"].append(token_ids.to(torch.int32))
        for r in rows:
            spans.append(
                {
                    "prompt_id": seqs.prompt_ids[r],
                    "sample_idx": seqs.sample_idx[r],
                    "source_row": r,
                    "start": offset,
                    "length": counts[r],
                    "completion_start": seqs.completion_start(r, opts.include_prompt),
                    "prompt_sha256": token_digest(seqs.prompt_tokens[r]),
                }
            )
            offset += counts[r]
        if on_tokens:
            on_tokens(sum(counts[r] for r in rows))
    spans.sort(key=lambda span: span["source_row"])  # the index lists the rows in the file's order
    tensors = {name: torch.cat(parts) for name, parts in pieces.items()}
    scored = None
    if lm.weight.device.type == "cuda":
        scored = torch.cuda.Event()
        scored.record()
    return tensors, spans, scored
