"""Multi-turn conversations as sequences: one sequence per assistant reply.

A table with a ``messages`` column (each row a list of ``{role, content}``
messages) and no prompt/completion columns holds conversations.  Reply i of a
conversation (its i-th assistant message, at position j) becomes the sequence

    prompt     = template(messages[:j], with the assistant header)
    completion = template(messages[:j + 1])  minus that prompt's text

so the completion is the reply and the template's end-of-turn marker, and
the prompt is the conversation before it encoded as ``rollout`` encodes a
``messages`` prompt (:func:`fdivctl.io.prompts.encode_prompt`).  The two are
tokenized apart, as a sampled reply follows its prompt's tokens; where the
assistant header ends in a newline or a special token (Qwen2, Llama 3) that is
also how the whole conversation tokenizes, while a header ending in a space
would merge with the reply's first word in the whole text.  A loss over
the completions is the loss over the assistant replies only, each in its own
context: what TRL's ``SFTTrainer`` computes with ``assistant_only_loss`` on
the whole conversation (a causal model's prediction of a reply's tokens does
not depend on what follows), paid for by reading each prefix again.  A
template that rewrites earlier turns (one that drops past reasoning) gets the
prompts it will be sampled with, which one masked conversation would not give.

Row keys: ``prompt_id`` (or the row number) and ``sample_idx`` = the reply's
0-based index in its conversation, which is also each completion token's
``turn_ids`` entry (the turns of ``distill --depth-curriculum``).  The other
columns repeat on each of a conversation's rows.

The same split serves TRL's other conversational layouts: ``prompt`` and
``completion`` columns of messages (one sequence per row, its keys kept:
:func:`token_table`) and preference pairs (:func:`preference_pairs`).  A
``tools`` column (TRL's tool-calling datasets: each row's function schemas,
a list or JSON text) is given to the template with the row's messages, as
TRL's ``SFTTrainer`` gives it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa

from fdivctl import activity
from fdivctl.errors import UserError
from fdivctl.io.prompts import check_messages, parse_messages, render_chat, row_tools

_BLOCK = 4096  # replies tokenized in one call


def is_conversations(table: pa.Table) -> bool:
    """Whether a sequences table holds conversations (read through :func:`token_table`): a ``messages`` column,
    or ``prompt``/``completion`` columns of messages."""
    columns = table.column_names
    has_pairs = "prompt" in columns and "completion" in columns
    if "prompt_token_ids" in columns and "completion_token_ids" in columns:
        return False
    if has_pairs:
        return any(is_messages_column(table, c) for c in ("prompt", "completion"))
    return "messages" in columns


def token_table(table: pa.Table, path: Path, tokenizer) -> pa.Table:
    """The conversations ``table`` (:func:`is_conversations`) as a token-id sequences table: a ``messages`` table
    one row per assistant reply (:func:`expand`); a ``prompt``/``completion`` table of messages (TRL's
    conversational prompt-completion layout; text on either side is one user or assistant message) row for row,
    its keys and other columns kept."""
    if not ("prompt" in table.column_names and "completion" in table.column_names):
        return expand(table, path, tokenizer)
    check_chat_tokenizer(tokenizer, path)
    rows = enumerate(zip(table.column("prompt").to_pylist(), table.column("completion").to_pylist(),
                         _tools(table)))
    split = split_replies(tokenizer, ((_as_messages(prompt, "user", f"{path}: row {row}, prompt"),
                                       _as_messages(completion, "assistant", f"{path}: row {row}, completion"),
                                       f"{path}: row {row}", row_tools(tools, f"{path}: row {row}"))
                                      for row, (prompt, completion, tools) in rows), table.num_rows)
    prompts, completions = zip(*split) if table.num_rows else ((), ())
    tokens = pa.list_(pa.int32())
    return table.drop_columns(["prompt", "completion"]).append_column(
        "prompt_token_ids", pa.array(prompts, tokens)).append_column("completion_token_ids",
                                                                     pa.array(completions, tokens))


def _tools(table: pa.Table) -> list:
    """Each row's ``tools`` value (:func:`fdivctl.io.prompts.row_tools`), None for each without the column."""
    return table.column("tools").to_pylist() if "tools" in table.column_names else [None] * table.num_rows


def _as_messages(value, role: str, where: str) -> list[dict]:
    """``value`` as a list of messages: text is one message of ``role``; a list is checked."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    check_messages(value, where)
    return value


def check_chat_tokenizer(tokenizer, path: Path) -> None:
    """Refuse to read the messages of ``path`` without a tokenizer that has a chat template."""
    if tokenizer is None:
        raise UserError(f"{path}: a messages table needs a tokenizer")
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{path}: its messages are rendered with the tokenizer's chat template, and the tokenizer "
                        "has none")


def split_replies(tokenizer, items: Iterable[tuple[list[dict], list[dict], str, list[dict] | None]],
                  total: int) -> Iterator[tuple[list, list]]:
    """(prompt ids, reply ids) of each ``(before, reply, where, tools)`` of ``items``, in order: the prompt is the
    conversation ``before`` with the assistant header, as rollout encodes it; the reply is the rest of the
    rendering of ``before + reply`` (module doc); both are rendered with the functions ``tools`` (or none).
    Rendered one by one and tokenized a block at a time: one batch call of the fast tokenizer per block is ~2×
    faster than one call per text, what the tokenizing costs of a million replies (``where`` names an item in
    errors).  After each block, the progress of the ``total`` items goes to :func:`fdivctl.activity.report`."""
    items, done = iter(items), 0
    while block := list(itertools.islice(items, _BLOCK)):
        prompts, replies = [], []
        for before, reply, where, tools in block:
            prompt = render_chat(tokenizer, before, where, generation_prompt=True, tools=tools)
            full = render_chat(tokenizer, before + reply, where, generation_prompt=False, tools=tools)
            if not full.startswith(prompt):
                raise UserError(f"{where}: the chat template renders the conversation before the reply "
                                "differently once the reply follows, so the reply has no prompt to split at")
            prompts.append(prompt)
            replies.append(full[len(prompt):])
        yield from zip(tokenizer(prompts, add_special_tokens=False)["input_ids"],
                       tokenizer(replies, add_special_tokens=False)["input_ids"])
        done += len(block)
        activity.report("chat template", "replies", done, total)


def expand(table: pa.Table, path: Path, tokenizer) -> pa.Table:
    """The conversations ``table`` as a token-id sequences table: one row per assistant reply (module doc)."""
    check_chat_tokenizer(tokenizer, path)
    for column in ("sample_idx", "turn_ids"):
        if column in table.column_names:
            raise UserError(f"{path}: a messages table has one conversation per row, and {column} is set from "
                            f"its assistant replies: drop the {column} column")
    keys = ([str(v) for v in table.column("prompt_id").to_pylist()] if "prompt_id" in table.column_names
            else [str(r) for r in range(table.num_rows)])
    take, reply_idx = [], []
    where = [f"{path}: row {row} (prompt_id {key!r})" for row, key in enumerate(keys)]
    chats = [parse_messages(messages, where[row]) for row, messages in enumerate(table.column("messages").to_pylist())]
    total = sum(m["role"] == "assistant" for chat in chats for m in chat)

    def replies():
        for row, (messages, tools) in enumerate(zip(chats, _tools(table))):
            tools = row_tools(tools, where[row])
            positions = [j for j, message in enumerate(messages) if message["role"] == "assistant"]
            if not positions:
                raise UserError(f"{where[row]} has no assistant message: nothing to train on")
            if positions[0] == 0:
                raise UserError(f"{where[row]} opens with an assistant message: it has no context to be predicted from")
            for index, j in enumerate(positions):
                take.append(row)
                reply_idx.append(index)
                yield messages[:j], messages[j : j + 1], f"{where[row]}, reply {index}", tools

    prompts, completions = zip(*split_replies(tokenizer, replies(), total)) if table.num_rows else ((), ())
    carried = table.drop_columns([c for c in ("messages", "prompt_id") if c in table.column_names]).take(take)
    tokens = pa.list_(pa.int32())
    turns = [[index] * len(completion) for index, completion in zip(reply_idx, completions)]
    return pa.table({"prompt_id": [keys[r] for r in take], "sample_idx": pa.array(reply_idx, pa.int64()),
                     "prompt_token_ids": pa.array(prompts, tokens),
                     "completion_token_ids": pa.array(completions, tokens), "turn_ids": pa.array(turns, tokens),
                     **{name: carried.column(name) for name in carried.column_names}})


def is_messages_column(table: pa.Table, column: str) -> bool:
    """Whether ``column`` of ``table`` holds lists of messages (list<struct>)."""
    kind = table.schema.field(column).type
    return (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_struct(kind.value_type)


def shared_opening(chosen, rejected) -> int:
    """How many items (messages, or characters of text) ``chosen`` and ``rejected`` open with alike: the
    implicit prompt of a preference pair (TRL's ``extract_prompt``)."""
    return next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))


def preference_pairs(table: pa.Table, path: Path, tokenizer) -> dict[str, tuple[list, list]]:
    """Conversational preference pairs as (prompt ids, response ids) of each row, for ``"chosen"`` and
    ``"rejected"``, in TRL's two conversational layouts:

    * explicit: ``prompt`` messages (or text: one user message), ``chosen``/``rejected`` the messages that follow
      (or text: one assistant message);
    * implicit: no ``prompt`` column, ``chosen``/``rejected`` whole conversations whose shared opening messages
      are the prompt (TRL's ``extract_prompt``).

    Each side is split by :func:`split_replies`: the prompt as rollout encodes it, the response with its
    end-of-turn."""
    check_chat_tokenizer(tokenizer, path)
    rows = zip(table.column("prompt").to_pylist() if "prompt" in table.column_names else [None] * table.num_rows,
               table.column("chosen").to_pylist(), table.column("rejected").to_pylist(), _tools(table))

    def sides():  # each row's chosen, then its rejected
        for row, (prompt, chosen, rejected, tools) in enumerate(rows):
            where = f"{path}: row {row}"
            tools = row_tools(tools, where)
            if prompt is None:
                check_messages(chosen, f"{where}, chosen")
                check_messages(rejected, f"{where}, rejected")
                shared = shared_opening(chosen, rejected)
                if shared == 0:
                    raise UserError(f"{where}: chosen and rejected open with different messages, so they share "
                                    "no prompt: give a prompt column")
                prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
            prompt = _as_messages(prompt, "user", f"{where}, prompt")
            for side, reply in (("chosen", chosen), ("rejected", rejected)):
                if not reply:
                    raise UserError(f"{where}: the {side} response has no message after the prompt")
                yield prompt, _as_messages(reply, "assistant", f"{where}, {side}"), f"{where}, {side}", tools

    split = list(split_replies(tokenizer, sides(), 2 * table.num_rows))
    return {side: ([p for p, _ in split[first::2]], [r for _, r in split[first::2]])
            for first, side in enumerate(("chosen", "rejected"))}
