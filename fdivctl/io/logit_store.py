"""The logit store: a teacher's top-k distributions, cached once (DESIGN.md, "Logit store").

Layout of a store directory::

    store.json               settings and the shard plan, written first (a resumed or
                             parallel run must match it exactly)
    shard-00000.safetensors  per scored token: ids int32 [T,k], logprobs [T,k] (bf16|fp16|fp32,
                             at the store's temperature), log_tail f32 [T] = log(1 − Σ top-k p),
                             token_logprob f32 [T] (the scored token's own log-prob, which may
                             lie outside the top-k), token_ids int32 [T] (the scored tokens)
    shard-00000.json         sidecar: the shard's sha256, rows and per-row spans; its presence
                             marks the shard finished, so a finished shard is never rewritten
    index.parquet            per source row: prompt_id, sample_idx, source_row, shard, start,
                             length, completion_start (offset of the first completion token),
                             prompt_sha256 (of the prompt token ids the teacher was given)
    manifest.json            store.json + every shard's file, sha256, rows and token count;
                             written last, once every shard is done

Shards are written with temp-file + rename; the sidecar only after its shard,
and the manifest only after every sidecar.  Several processes (``--shard i/n``)
write disjoint shards of one plan and never the same file, except the
manifest, which each writes identically.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open

from fdivctl import __version__
from fdivctl.errors import UserError
from fdivctl.io.atomic import atomic_path, check_output_dir, write_json
from fdivctl.io.hashing import file_sha256, token_digest
from fdivctl.io.sequences import Sequences
from fdivctl.io.tensor_file import DTYPE_NAMES, save_safetensors
from fdivctl.io.versions import library_versions

FORMAT = "fdivctl-logit-store"
FORMAT_VERSION = 1
STORE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TENSORS = ("ids", "logprobs", "log_tail", "token_logprob", "token_ids")


def shard_layout(n_tokens: int, k: int, store_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Each tensor of a shard of ``n_tokens`` scored tokens, by name (in ``TENSORS``' order): its shape and dtype."""
    return {"ids": ((n_tokens, k), torch.int32), "logprobs": ((n_tokens, k), store_dtype),
            "log_tail": ((n_tokens,), torch.float32), "token_logprob": ((n_tokens,), torch.float32),
            "token_ids": ((n_tokens,), torch.int32)}


INDEX_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("sample_idx", pa.int64()),
        ("source_row", pa.int64()),
        ("shard", pa.int32()),
        ("start", pa.int64()),
        ("length", pa.int64()),
        ("completion_start", pa.int64()),
        ("prompt_sha256", pa.string()),  # of the prompt tokens the teacher saw (null in stores made before)
    ]
)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


SHARD_BYTES = 64 << 20


def default_shard_tokens(directory: str | Path, k: int, dtype: str) -> int:
    """``--max-tokens-per-shard``'s default: the limit a store being resumed was made with, else as many tokens
    as fill about ``SHARD_BYTES`` (64 MiB) at this k and dtype.

    Shards are written in the background while the next one is scored, so only the last shard's write is not
    hidden behind the teacher's work: small shards keep that tail short (and a resume redoes little), while
    1e9 tokens at k = 64 still make only ~6000 files.
    """
    store_json = Path(directory) / "store.json"
    if store_json.is_file():
        recorded = json.loads(store_json.read_text()).get("max_tokens_per_shard")
        if isinstance(recorded, int):
            return recorded
    bytes_per_token = sum(shape[-1] * dt.itemsize for shape, dt in shard_layout(1, k, STORE_DTYPES[dtype]).values())
    return max(1, SHARD_BYTES // bytes_per_token)


def plan_shards(token_counts: list[int], max_tokens_per_shard: int, rows_per_batch: int = 1) -> list[dict]:
    """Cut rows, in order, into shards of at most ``max_tokens_per_shard`` tokens.

    A row never straddles shards; a row longer than the limit gets a shard of
    its own.  A shard that fills up is cut after the last whole multiple of
    ``rows_per_batch`` rows that fits (after every row that fits when fewer
    than ``rows_per_batch`` do), so the batches of ``rows_per_batch`` a shard is
    scored in are all full but the store's last: a shard that ends in a short
    batch pays the teacher's fixed cost per batch for a few rows (on an H200,
    26 ms for a 4-row piece against 77 ms for 16 rows of 1024 tokens,
    ``bench/results/teacher_logits_cuda_h200_pinned.jsonl``).  The plan depends
    only on the counts, the limit and ``rows_per_batch``, so every run over the
    same source and settings makes the same shards.
    """
    shards: list[dict] = []
    start, tokens, row = 0, 0, 0
    while row < len(token_counts):
        if row > start and tokens + token_counts[row] > max_tokens_per_shard:
            cut = start + (row - start) // rows_per_batch * rows_per_batch
            cut = cut if cut > start else row
            shards.append({"rows": [start, cut], "n_tokens": sum(token_counts[start:cut])})
            start, tokens, row = cut, 0, cut
            continue
        tokens += token_counts[row]
        row += 1
    if start < len(token_counts):
        shards.append({"rows": [start, len(token_counts)], "n_tokens": tokens})
    return shards


def resumable_plan(directory: str | Path, token_counts: list[int], max_tokens_per_shard: int,
                   rows_per_batch: int) -> list[dict]:
    """The shard plan for a store in ``directory``: :func:`plan_shards` with ``rows_per_batch``, unless the store
    is being resumed and was planned with every row a possible cut (fdivctl before shards ended between whole
    batches), where its recorded plan is kept, so an upgrade mid-run finishes the store instead of refusing it."""
    plan = plan_shards(token_counts, max_tokens_per_shard, rows_per_batch)
    store_json = Path(directory) / "store.json"
    if store_json.is_file():
        recorded = json.loads(store_json.read_text()).get("shards")
        if recorded != plan and recorded == plan_shards(token_counts, max_tokens_per_shard):
            return recorded
    return plan


class StoreWriter:
    """Writes the shards of one store; resumable and safe for disjoint parallel writers."""

    def __init__(self, directory: str | Path, settings: dict):
        self.directory = check_output_dir(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.settings = {"format": FORMAT, "format_version": FORMAT_VERSION, **settings}
        store_json = self.directory / "store.json"
        if store_json.exists():
            existing = json.loads(store_json.read_text())
            differing = sorted(
                key for key in set(existing) | set(self.settings)
                if key != "fdivctl_version" and existing.get(key) != self.settings.get(key)
            )
            if differing:
                raise UserError(
                    f"{self.directory} holds a store made with other settings ({', '.join(differing)}); "
                    "use a new output directory or the original settings"
                )
        else:
            write_json(store_json, self.settings)

    @property
    def shards(self) -> list[dict]:
        return self.settings["shards"]

    def is_done(self, index: int) -> bool:
        base = self.directory / shard_name(index)
        return base.with_suffix(".json").is_file() and base.with_suffix(".safetensors").is_file()

    def write_shard(self, index: int, tensors: dict[str, torch.Tensor], rows: list[dict]) -> None:
        """Write shard ``index`` (tensors over its tokens, one span dict per row), then its sidecar."""
        missing = set(TENSORS) - set(tensors)
        if missing:
            raise ValueError(f"shard {index}: missing tensors {sorted(missing)}")
        base = self.directory / shard_name(index)
        with atomic_path(base.with_suffix(".safetensors")) as tmp:
            digest = save_safetensors({k: tensors[k].cpu() for k in TENSORS}, tmp)
        planned = self.shards[index]
        sidecar = {
            "file": base.with_suffix(".safetensors").name,
            "sha256": digest,
            "rows": planned["rows"],
            "n_tokens": int(tensors["ids"].shape[0]),
            "spans": rows,
        }
        write_json(base.with_suffix(".json"), sidecar)

    def finalize(self) -> bool:
        """Write ``index.parquet`` and ``manifest.json`` if every shard is done; say whether it was."""
        if not all(self.is_done(i) for i in range(len(self.shards))):
            return False
        columns: dict[str, list] = {name: [] for name in INDEX_SCHEMA.names}
        shard_entries = []
        for i in range(len(self.shards)):
            sidecar = json.loads((self.directory / shard_name(i)).with_suffix(".json").read_text())
            for span in sidecar.pop("spans"):
                for name in INDEX_SCHEMA.names:
                    columns[name].append(i if name == "shard" else span.get(name))
            shard_entries.append(sidecar)
        with atomic_path(self.directory / "index.parquet") as tmp:
            pq.write_table(pa.table(columns, schema=INDEX_SCHEMA), tmp)
        manifest = {**self.settings, "fdivctl_version": __version__, "versions": library_versions(),
                    "shards": shard_entries}
        write_json(self.directory / "manifest.json", manifest)
        return True


@dataclass
class StoredSequence:
    """One sequence's stored tokens, in order; tensors are views read from the mapped shard."""

    prompt_id: str
    sample_idx: int
    token_ids: torch.Tensor  # int32 [L]
    ids: torch.Tensor  # int32 [L, k]
    logprobs: torch.Tensor  # [L, k], the store's dtype
    log_tail: torch.Tensor  # f32 [L]
    token_logprob: torch.Tensor  # f32 [L]
    completion_start: int


class LogitStore:
    """Read access to a finished store, memory-mapped shard by shard."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        manifest_path = self.directory / "manifest.json"
        if not manifest_path.is_file():
            if (self.directory / "store.json").is_file():
                raise UserError(
                    f"logit store {self.directory} is incomplete (no manifest.json): "
                    "rerun the same teacher-logits command to finish it"
                )
            raise UserError(f"{self.directory}: not a logit store (no manifest.json)")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise UserError(f"{manifest_path}: not an fdivctl logit store manifest")
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{manifest_path}: store format version {self.manifest.get('format_version')}, "
                f"this fdivctl reads version {FORMAT_VERSION}"
            )
        index = pq.read_table(self.directory / "index.parquet").to_pydict()
        self._rows = {
            (pid, int(sidx)): i for i, (pid, sidx) in enumerate(zip(index["prompt_id"], index["sample_idx"]))
        }
        self._index = index
        self._handles: dict[int, object] = {}

    k = property(lambda self: int(self.manifest["k"]))
    temperature = property(lambda self: float(self.manifest["temperature"]))
    vocab_size = property(lambda self: int(self.manifest["vocab_size"]))
    tokenizer_hash = property(lambda self: self.manifest["tokenizer_hash"])

    def __len__(self) -> int:
        return len(self._rows)

    def check_tokenizer(self, tokenizer_hash: str, who: str, allow_mismatch: bool = False) -> None:
        """Refuse a consumer whose tokenizer differs from the teacher's (ids would not line up)."""
        if tokenizer_hash != self.tokenizer_hash and not allow_mismatch:
            raise UserError(
                f"tokenizer mismatch: {who} has tokenizer hash {tokenizer_hash[:16]}… but logit store "
                f"{self.directory} was made with {self.tokenizer_hash[:16]}…; use a store made with the "
                "same tokenizer (--allow-tokenizer-mismatch skips this check and is unsafe)"
            )

    def check_chat(self, chat: bool) -> None:
        """Refuse a consumer that encodes text prompts otherwise than the store's source was (``--chat``): the
        completions would match while the teacher was conditioned on other prompt tokens."""
        if bool(self.manifest.get("chat", False)) != chat:
            made = "with" if self.manifest.get("chat") else "without"
            raise UserError(f"logit store {self.directory} was made {made} --chat (its text prompts "
                            f"{'in' if made == 'with' else 'outside'} the chat template): give the same here")

    def check_max_length(self, max_length: int | None) -> None:
        """Refuse a consumer that cuts the sequences otherwise than the store's were (``--max-length``): the
        rows' completions would be of other lengths."""
        made = self.manifest.get("max_length")
        if made != max_length:
            said = lambda n: "without --max-length" if n is None else f"with --max-length {n}"  # noqa: E731
            raise UserError(f"logit store {self.directory} was made {said(made)}: give the same here (this run "
                            f"is {said(max_length)})")

    def check_rows(self, seqs: Sequences, data: Path, allow_prompt_mismatch: bool = False) -> None:
        """Refuse, before any work, rows of ``seqs`` (read from ``data``) the store cannot serve: a key it lacks, a
        completion of another length, or, unless ``allow_prompt_mismatch``, a prompt other than the one the teacher
        was given (another chat template or ``--chat`` setting, other prompt text).  The last is what context
        distillation does on purpose; stores made before prompts were recorded skip it.  (The completion's tokens
        themselves are compared as each batch reads them.)"""
        digests = self._index.get("prompt_sha256")
        for row in range(len(seqs)):
            key = (seqs.prompt_ids[row], seqs.sample_idx[row])
            where = f"prompt_id {key[0]!r} sample_idx {key[1]} of {data}"
            i = self._rows.get(key)
            if i is None:
                missing = sum((p, s) not in self._rows for p, s in zip(seqs.prompt_ids, seqs.sample_idx))
                raise UserError(f"logit store {self.directory} has no sequence {where} ({missing} of the data's "
                                f"{len(seqs)} rows are not in it): it was made for other sequences")
            stored = self._index["length"][i] - self._index["completion_start"][i]
            if stored != len(seqs.completion_tokens[row]):
                raise UserError(f"logit store {self.directory} was made for other sequences: {where} has "
                                f"{len(seqs.completion_tokens[row])} completion tokens, the store {stored}")
            if not allow_prompt_mismatch and digests and digests[i] is not None \
                    and digests[i] != token_digest(seqs.prompt_tokens[row]):
                raise UserError(f"logit store {self.directory}: the teacher was given other prompt tokens for "
                                f"{where} (another chat template or --chat setting, or other prompt text); "
                                "--allow-prompt-mismatch distils from it anyway, as context distillation does")

    def _shard(self, index: int):
        """Shard ``index``, its checksum checked when it is first opened (a flipped bit in a stored log-prob
        would otherwise train on silently; the cost is one sequential read of the shard, ~1.7 GB/s)."""
        if index not in self._handles:
            entry = self.manifest["shards"][index]
            path = self.directory / entry["file"]
            damage = "missing" if not path.is_file() else \
                "corrupted (its checksum differs from the manifest)" if file_sha256(path) != entry["sha256"] else None
            if damage:
                raise UserError(f"logit store {self.directory}: {entry['file']} is {damage}; "
                                f"`fdivctl teacher-logits --verify {self.directory}` lists every damaged shard")
            self._handles[index] = safe_open(str(path), framework="pt")
        return self._handles[index]

    def sequence(self, prompt_id: str, sample_idx: int) -> StoredSequence:
        """The stored tokens of one sequence, by its row key."""
        key = (str(prompt_id), int(sample_idx))
        if key not in self._rows:
            raise UserError(
                f"logit store {self.directory} has no sequence prompt_id={key[0]!r} sample_idx={key[1]}: "
                "it was made for other sequences"
            )
        row = self._rows[key]
        start, length = self._index["start"][row], self._index["length"][row]
        handle = self._shard(self._index["shard"][row])
        return StoredSequence(
            prompt_id=key[0],
            sample_idx=key[1],
            completion_start=self._index["completion_start"][row],
            **{name: handle.get_slice(name)[start : start + length] for name in TENSORS},
        )

    def iter_aligned(self, keys: Iterable[tuple[str, int]]) -> Iterator[StoredSequence]:
        """Stream the stored sequences in the order of ``keys`` (prompt_id, sample_idx)."""
        for prompt_id, sample_idx in keys:
            yield self.sequence(prompt_id, sample_idx)


def verify_store(directory: str | Path) -> list[str]:
    """Every problem found in a store: checksums, dtypes, shapes, and row coverage. Empty = sound.

    A directory that is no store (or an unfinished one) raises UserError: there is nothing to check.
    """
    directory = Path(directory)
    store = LogitStore(directory)
    problems: list[str] = []
    manifest = store.manifest
    k = int(manifest["k"])
    for i, entry in enumerate(manifest["shards"]):
        path = directory / entry["file"]
        if not path.is_file():
            problems.append(f"shard {i}: {entry['file']} is missing")
            continue
        if file_sha256(path) != entry["sha256"]:
            problems.append(f"shard {i}: {entry['file']} checksum differs from the manifest (corrupted)")
            continue
        layout = shard_layout(entry["n_tokens"], k, STORE_DTYPES[manifest["dtype"]])
        with safe_open(str(path), framework="pt") as handle:
            for name, (want, dtype) in layout.items():
                if name not in handle.keys():
                    problems.append(f"shard {i}: tensor {name} is missing")
                    continue
                tensor_slice = handle.get_slice(name)
                shape = tuple(tensor_slice.get_shape())
                if shape != want:
                    problems.append(f"shard {i}: {name} has shape {shape}, manifest implies {want}")
                if tensor_slice.get_dtype() != DTYPE_NAMES[dtype]:
                    problems.append(
                        f"shard {i}: {name} has dtype {tensor_slice.get_dtype()}, expected {DTYPE_NAMES[dtype]}"
                    )
    index = store._index
    rows = sorted(index["source_row"])
    n_rows = int(manifest["source_rows"])
    if rows != list(range(n_rows)):
        seen: dict[int, int] = {}
        for r in rows:
            seen[r] = seen.get(r, 0) + 1
        duplicated = sorted(r for r, c in seen.items() if c > 1)
        missing = sorted(set(range(n_rows)) - set(seen))
        if duplicated:
            problems.append(f"source rows covered more than once: {duplicated[:10]}")
        if missing:
            problems.append(f"source rows not covered: {missing[:10]}")
    if len(store) != len(index["prompt_id"]):
        problems.append("duplicate (prompt_id, sample_idx) keys in the index")
    for i, entry in enumerate(manifest["shards"]):
        spans = sorted(
            (s, l) for s, l, sh in zip(index["start"], index["length"], index["shard"]) if sh == i
        )
        covered = sum(l for _, l in spans)
        if covered != entry["n_tokens"]:
            problems.append(f"shard {i}: index spans cover {covered} tokens, shard has {entry['n_tokens']}")
    return problems
