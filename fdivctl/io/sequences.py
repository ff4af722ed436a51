"""Sequences to score: prompt + completion token ids with their row keys.

Accepted tables (Parquet):

* rollouts from ``fdivctl rollout``: ``prompt_token_ids`` and
  ``completion_token_ids`` (list<int>);
* any table with text ``prompt`` and ``completion`` columns, tokenized here
  with the given tokenizer: the prompt with the tokenizer's special tokens,
  the completion without, then the tokenizer's EOS token after a non-empty
  completion that does not end with it (so ``prompt_ids + completion_ids`` is
  the sequence, and a model trained on it learns where an answer ends; TRL's
  SFT and DPO trainers append it the same way);
* plain text, a ``text`` column (TRL's language-modeling layout): every
  token is scored, as TRL's ``SFTTrainer`` trains on such a table; the text
  is tokenized with the tokenizer's special tokens and the EOS token after
  it, and the first token, which nothing predicts, is the prompt;
* conversations: a ``messages`` column, one row per assistant reply, or
  ``prompt``/``completion`` columns of messages (TRL's conversational
  layouts; :mod:`fdivctl.io.conversations`, read with :func:`read_sequences`).

Row keys are ``prompt_id`` (any scalar; kept as text) and ``sample_idx``
(default 0); without ``prompt_id`` the row number is the key.  Keys must be
unique.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from fdivctl.errors import UserError
from fdivctl.io import conversations
from fdivctl.io.checkpoints import ModelLimits
from fdivctl.io.device_copy import upload
from fdivctl.io.prompts import encode_prompt
from fdivctl.io.tables import provenance, read_table, require_no_nulls


@dataclass
class Sequences:
    prompt_ids: list[str]
    sample_idx: list[int]
    prompt_tokens: list[np.ndarray]
    completion_tokens: list[np.ndarray]
    tokenizer_hash: str | None  # recorded in the file's provenance, when it has one
    truncated: int = 0  # rows whose completion --max-length cut (read_sequences)
    dropped: int = 0  # rows --max-length dropped: their prompt alone fills it (read_sequences)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def first_scored(self, row: int, include_prompt: bool) -> int:
        """Position of the first scored token: the first completion token, or with
        ``include_prompt`` the second prompt token (the first has no context).

        A completion after an empty prompt cannot be scored: its first token has no context.
        """
        prompt, completion = self.prompt_tokens[row], self.completion_tokens[row]
        if include_prompt:
            return 1
        if len(prompt) == 0 and len(completion) > 0:
            raise UserError(
                f"row {row} (prompt_id {self.prompt_ids[row]!r}) has an empty prompt: its first "
                "completion token has no context to be scored in"
            )
        return len(prompt)

    def check_scorable(self, path: Path, include_prompt: bool = False) -> list[int]:
        """Every row's scored-token count; refuses, before any work, a row :meth:`first_scored` cannot score
        and a table with no token to score at all (every completion empty): nothing to train on or cache."""
        counts = [self.scored_count(row, include_prompt) for row in range(len(self))]
        if not any(counts):
            what = "every sequence is shorter than 2 tokens" if include_prompt else "every completion is empty"
            raise UserError(f"{path}: no token to score: {what}")
        return counts

    def check_fits(self, path: Path, limits: ModelLimits) -> None:
        """Refuse, before any work, a row the models cannot take: a token id with no embedding (an index error in
        the first forward pass that meets it) or more tokens than the context (positions past it run silently,
        with scores nobody should trust)."""
        for row in range(len(self)):
            prompt, completion = self.prompt_tokens[row], self.completion_tokens[row]
            where = f"{path}: row {row} (prompt_id {self.prompt_ids[row]!r})"
            length = len(prompt) + len(completion)
            if limits.context is not None and length > limits.context:
                raise UserError(f"{where} has {length} tokens, more than the {limits.context}-token context of the "
                                f"{limits.context_of} (its config.json): drop or shorten such rows (rollouts: sample "
                                "them with a lower --max-new-tokens)")
            for part in (prompt, completion):
                if len(part) and (int(part.min()) < 0 or int(part.max()) >= limits.vocab_size):
                    bad = int(part.min()) if int(part.min()) < 0 else int(part.max())
                    raise UserError(f"{where} has token id {bad}, outside the {limits.vocab_size}-id vocabulary "
                                    f"of the {limits.vocab_of}: was it tokenized for another model?")

    def truncate(self, max_length: int) -> tuple[list[int], list[int]]:
        """Cut each row's completion so that prompt + completion hold at most ``max_length`` tokens, keeping their
        start (TRL's ``max_length``).  Returns (the rows cut, the rows whose prompt alone fills ``max_length``):
        nothing of the latter's completions fits, so, as TRL trains on none of it, the caller drops them
        (:meth:`take`); a prompt is never cut, which would change what its completion answers."""
        check_max_length(max_length)
        cut, full = [], []
        for row, (prompt, completion) in enumerate(zip(self.prompt_tokens, self.completion_tokens)):
            if len(prompt) + len(completion) <= max_length:
                continue
            if len(prompt) >= max_length:
                full.append(row)
                continue
            self.completion_tokens[row] = completion[: max_length - len(prompt)]
            cut.append(row)
        return cut, full

    def take(self, rows: list[int]) -> Sequences:
        """The sequences of ``rows``, in that order."""
        return Sequences([self.prompt_ids[r] for r in rows], [self.sample_idx[r] for r in rows],
                         [self.prompt_tokens[r] for r in rows], [self.completion_tokens[r] for r in rows],
                         self.tokenizer_hash)

    def lengths(self) -> list[int]:
        """Each row's prompt + completion tokens."""
        return [len(p) + len(c) for p, c in zip(self.prompt_tokens, self.completion_tokens)]

    def by_length(self, rows: Iterable[int], batch_size: int) -> list[list[int]]:
        """``rows`` in batches of at most ``batch_size``, longest sequences first: a batch of similar lengths pads
        little, where one in the file's order pads to its longest."""
        lengths = self.lengths()
        ordered = sorted(rows, key=lambda r: -lengths[r])
        return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]

    def cut_counts(self) -> dict[str, int]:
        """What ``--max-length`` did to the rows read (:func:`read_sequences`), as a summary reports it."""
        return cut_counts(self.truncated, self.dropped)

    def scored_count(self, row: int, include_prompt: bool) -> int:
        """How many tokens of ``row`` are scored."""
        total = len(self.prompt_tokens[row]) + len(self.completion_tokens[row])
        return max(total - self.first_scored(row, include_prompt), 0)

    def completion_start(self, row: int, include_prompt: bool) -> int:
        """Offset of the first completion token among the row's scored tokens."""
        return max(len(self.prompt_tokens[row]) - 1, 0) if include_prompt else 0

    def check_tokenizer(self, path: Path, expected_hash: str, expected_of: str, allow_mismatch: bool) -> None:
        """Refuse a file tokenized with another tokenizer than ``expected_of``'s (when its provenance says)."""
        if self.tokenizer_hash and self.tokenizer_hash != expected_hash and not allow_mismatch:
            raise UserError(f"tokenizer mismatch: {path} was tokenized with {self.tokenizer_hash[:16]}…, the "
                            f"{expected_of} has {expected_hash[:16]}… (--allow-tokenizer-mismatch skips this check "
                            "and is unsafe)")

    def batch(self, rows, pad_id: int, include_prompt: bool = False,
              device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Teacher-forcing tensors for ``rows`` (int64, on ``device``: the host by default; to CUDA without the host
        waiting, :func:`~fdivctl.io.device_copy.upload`).

        ``input_ids`` ``[B, L]`` (prompt + completion, right-padded with ``pad_id``: a causal decoder needs no
        mask for the real positions, :meth:`fdivctl.io.lm_head.LMHead.hidden`), and for every scored token in
        row order: ``batch_index``, ``position`` (the position whose hidden state predicts it) and ``token``.
        """
        full = [np.concatenate((self.prompt_tokens[r], self.completion_tokens[r])) for r in rows]
        input_ids = torch.full((len(full), max(1, max((len(f) for f in full), default=0))), pad_id, dtype=torch.long)
        batch_index, position, token = [], [], []
        for b, (r, tokens) in enumerate(zip(rows, full)):
            input_ids[b, : len(tokens)] = torch.from_numpy(tokens)
            scored = np.arange(self.first_scored(r, include_prompt), len(tokens))
            batch_index.append(np.full(len(scored), b))
            position.append(scored - 1)
            token.append(tokens[scored])
        as_tensor = lambda parts: torch.from_numpy(np.concatenate(parts).astype(np.int64))  # noqa: E731
        batch = {"input_ids": input_ids, "batch_index": as_tensor(batch_index), "position": as_tensor(position),
                 "token": as_tensor(token)}
        return batch if device is None else {name: upload(t, device) for name, t in batch.items()}


def cut_counts(truncated: int, dropped: int) -> dict[str, int]:
    """A summary's count of the rows ``--max-length`` cut and of those it dropped."""
    return {"truncated_rows": truncated, "dropped_rows": dropped}


def kept_rows(count: int, dropped: list[int], path: Path, max_length: int, what: str) -> list[int]:
    """The rows of ``count`` left once ``--max-length`` drops ``dropped`` (:meth:`Sequences.truncate`); one
    UserError when none is left (``what``: what the rows are, in the message)."""
    keep = sorted(set(range(count)) - set(dropped))
    if not keep:
        raise UserError(f"{path}: every prompt alone fills --max-length {max_length}: no {what} is left")
    return keep


def check_max_length(max_length: int | None) -> None:
    """Refuse a ``--max-length`` (when given) that leaves no completion token after a one-token prompt."""
    if max_length is not None and max_length < 2:
        raise UserError(f"--max-length must be ≥ 2 tokens, got {max_length}")


def int_list_column(table: pa.Table, column: str, path: Path) -> list[np.ndarray]:
    """The list<int> ``column`` as one int64 array per row (token ids; see :func:`list_column`)."""
    return list_column(table, column, path, np.int64)


def list_column(table: pa.Table, column: str, path: Path, dtype=np.int64) -> list[np.ndarray]:
    """A list<int> (``dtype`` integer) or list<number> (``dtype`` floating) column as one ``dtype`` array per
    row; UserError for another type, a null row (a missing completion is no empty one) or a null value. Views
    into one flat array, without a Python object per value (``to_pylist`` needs ~30 bytes per token)."""
    kind = table.schema.field(column).type
    numbers = pa.types.is_integer if np.issubdtype(dtype, np.integer) else _is_number
    if not ((pa.types.is_list(kind) or pa.types.is_large_list(kind)) and numbers(kind.value_type)):
        wanted = "list<int>" if numbers is pa.types.is_integer else "list<float>"
        raise UserError(f"{path}: column {column!r} must be {wanted}, got {kind}")
    require_no_nulls(path, column, table.column(column))
    lists = table.column(column).combine_chunks()
    flat = lists.flatten()  # the rows' values in order
    if flat.null_count:
        raise UserError(f"{path}: column {column!r} has null values inside its lists")
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    if len(lengths) == 0:
        return []
    return np.split(flat.to_numpy(zero_copy_only=False).astype(dtype), np.cumsum(lengths)[:-1])


# a recorded log-prob above this is no log-prob (a probability, a logit): log p ≤ 0, up to low-precision rounding
_MAX_LOGPROB = 1e-2


def sampled_logprobs(table: pa.Table, path: Path, seqs: Sequences, dtype=np.float32) -> list[np.ndarray]:
    """The ``completion_logprobs`` column, one array per row: one finite log-prob ≤ 0 per completion token of
    ``seqs`` (rollout's record of the sampling policy), or one UserError naming the row."""
    logprobs = list_column(table, "completion_logprobs", path, dtype)
    for row, (values, tokens) in enumerate(zip(logprobs, seqs.completion_tokens)):
        if len(values) != len(tokens):
            raise UserError(f"{path}: row {row} has {len(tokens)} completion tokens but {len(values)} log-probs")
        bad = np.flatnonzero(~np.isfinite(values) | (values > _MAX_LOGPROB))
        if len(bad):
            raise UserError(f"{path}: row {row}: completion_logprobs[{int(bad[0])}] is {values[bad[0]]}, not the "
                            "log-prob of a sampled token (finite, ≤ 0)")
    return logprobs


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def text_column(table: pa.Table, column: str, path: Path) -> list[str]:
    """A string column's values; one UserError naming the column when it is not text or holds a null."""
    field = table.schema.field(column).type
    if not (pa.types.is_string(field) or pa.types.is_large_string(field)):
        raise UserError(f"{path}: column {column!r} must be text, got {field}")
    require_no_nulls(path, column, table.column(column))
    return table.column(column).to_pylist()


def load_sequences(path: str | Path, tokenizer=None, chat: bool = False, max_length: int | None = None) -> Sequences:
    """Read a sequences table; ``tokenizer`` is needed only for text columns (``chat``: see
    :func:`sequences_from_table`; ``max_length``: see :func:`read_sequences`)."""
    return read_sequences(path, tokenizer, chat, max_length)[1]


def read_sequences(path: str | Path, tokenizer=None, chat: bool = False,
                   max_length: int | None = None) -> tuple[pa.Table, Sequences]:
    """A sequences file as (its rows, their sequences), row for row: a conversations table's rows are its
    assistant replies (:mod:`fdivctl.io.conversations`, rendered with the chat template whatever ``chat`` says).
    With ``max_length`` each sequence is cut to that many tokens (:meth:`Sequences.truncate`; a ``turn_ids``
    column with it) and a row whose prompt alone fills it is dropped; ``seqs.truncated`` and ``seqs.dropped``
    count them."""
    path = Path(path)
    table = read_table(path)
    if conversations.is_conversations(table):
        table, chat = conversations.token_table(table, path, tokenizer), False
    seqs = sequences_from_table(table, path, tokenizer, chat)
    seqs.tokenizer_hash = provenance(path).get("tokenizer_hash")
    if max_length is not None:
        lengths = [len(c) for c in seqs.completion_tokens]
        cut, full = seqs.truncate(max_length)
        if cut and "turn_ids" in table.column_names:  # a row's turns cut with it (when they match it)
            turns = int_list_column(table, "turn_ids", path)
            table = table.set_column(table.column_names.index("turn_ids"), "turn_ids", pa.array(
                [t[: len(c)] if len(t) == n else t for t, c, n in zip(turns, seqs.completion_tokens, lengths)],
                pa.list_(pa.int32())))
        if full:
            keep = kept_rows(len(seqs), full, path, max_length, "sequence")
            table, seqs = table.take(keep), seqs.take(keep)
        seqs.truncated, seqs.dropped = len(cut), len(full)
    return table, seqs


def has_token_ids(columns: list[str]) -> bool:
    """Whether a sequences table with these columns is read by its token ids (else by its text columns)."""
    return "prompt_token_ids" in columns and "completion_token_ids" in columns


def sequences_from_table(table: pa.Table, path: Path, tokenizer=None, chat: bool = False) -> Sequences:
    """The sequences of a table already in memory (``path`` names it in errors; no tokenizer hash).

    ``chat`` wraps each text prompt in the tokenizer's chat template as ``rollout --chat`` does (a user turn and
    the assistant header), so a model trained on the table sees its prompts as it will be sampled; token-id
    tables were encoded when they were sampled, and ``chat`` refuses them.
    """
    names = table.column_names
    if has_token_ids(names):
        if chat:
            raise UserError(f"{path}: --chat wraps text prompts in the chat template, and this table holds token "
                            "ids (encoded when they were sampled: give --chat to that rollout instead)")
        prompts = int_list_column(table, "prompt_token_ids", path)
        completions = int_list_column(table, "completion_token_ids", path)
    elif "prompt" in names and "completion" in names:
        if tokenizer is None:
            raise UserError(f"{path}: text columns need a tokenizer")
        prompt_text, completion_text = text_column(table, "prompt", path), text_column(table, "completion", path)
        prompts = [np.asarray(encode_prompt(tokenizer, {"prompt": text, "prompt_id": row}, True)[1], dtype=np.int64)
                   for row, text in enumerate(prompt_text)] if chat else \
            [np.asarray(x, dtype=np.int64) for x in tokenizer(prompt_text, add_special_tokens=True)["input_ids"]]
        completions = [_ending_with_eos(x, tokenizer)
                       for x in tokenizer(completion_text, add_special_tokens=False)["input_ids"]]
    elif "text" in names:
        if tokenizer is None:
            raise UserError(f"{path}: a text column needs a tokenizer")
        if chat:
            raise UserError(f"{path}: --chat wraps prompts in the chat template, and a text column has none: drop "
                            "--chat, or give prompt and completion (or messages) columns")
        texts = tokenizer(text_column(table, "text", path), add_special_tokens=True)["input_ids"]
        prompts = [np.asarray(x[:1], dtype=np.int64) for x in texts]
        completions = [_ending_with_eos(x[1:], tokenizer) for x in texts]
    else:
        raise UserError(
            f"{path}: needs prompt_token_ids + completion_token_ids (list<int>), prompt + completion (text), text "
            f"(plain text) or messages (conversations) columns; it has {', '.join(names)}"
        )
    n = table.num_rows
    prompt_ids = (
        [str(v) for v in table.column("prompt_id").to_pylist()] if "prompt_id" in names else [str(i) for i in range(n)]
    )
    if "sample_idx" in names:
        if not pa.types.is_integer(table.schema.field("sample_idx").type):
            raise UserError(f"{path}: column 'sample_idx' must be integer")
        sample_idx = [int(v) for v in table.column("sample_idx").to_pylist()]
    else:
        sample_idx = [0] * n
    keys = set(zip(prompt_ids, sample_idx))
    if len(keys) != n:
        raise UserError(f"{path}: (prompt_id, sample_idx) is not unique across rows")
    return Sequences(prompt_ids, sample_idx, prompts, completions, None)


def _ending_with_eos(ids: list[int], tokenizer) -> np.ndarray:
    """Completion ids with the tokenizer's EOS token after them, unless they are empty or end with it."""
    eos = tokenizer.eos_token_id
    return np.asarray(ids + [eos] if ids and eos is not None and ids[-1] != eos else ids, dtype=np.int64)
