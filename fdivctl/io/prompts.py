"""Prompts as token ids: plain text with the tokenizer's special tokens, or through its chat template."""

from __future__ import annotations

import datetime
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from transformers.utils import chat_template_utils

from fdivctl.errors import UserError

# The date a chat template sees through ``strftime_now``: the default of Llama 3.1's template, which Llama 3.2's and
# later ones replace by today's ("Today Date: 26 Nov 2026" in their system header).  With today's, one conversation
# would be other tokens on another day, so data read on Tuesday would not match the logit store made on Monday, nor
# a rerun reproduce a run; with this one, every rendering of the same messages is the same text.
TEMPLATE_DATE = datetime.date(2024, 7, 26)


class _TemplateClock(datetime.datetime):
    """A ``datetime`` whose ``now()`` is :data:`TEMPLATE_DATE` at midnight."""

    @classmethod
    def now(cls, tz=None) -> datetime.datetime:
        return cls(TEMPLATE_DATE.year, TEMPLATE_DATE.month, TEMPLATE_DATE.day, tzinfo=tz)


_CLOCK_LOCK = threading.Lock()


@contextmanager
def _template_clock() -> Iterator[None]:
    """While rendering, the ``strftime_now`` transformers gives templates (``datetime.now().strftime``) reads
    :data:`TEMPLATE_DATE`.  transformers 5.24 turns every template argument into plain data, so a function of our own
    passed as ``strftime_now=`` (what earlier versions honoured) reached the template as a string ("'str' object is
    not callable" from every Llama 3 template); the clock the renderer's ``strftime_now`` reads
    (``chat_template_utils.datetime``) is replaced instead.  ``tests/test_chat_prompts.py`` checks the date with the
    installed transformers."""
    with _CLOCK_LOCK:
        saved = chat_template_utils.datetime
        chat_template_utils.datetime = _TemplateClock
        try:
            yield
        finally:
            chat_template_utils.datetime = saved


def encode_prompt(tokenizer, row: dict, chat: bool) -> tuple[str, list[int]]:
    """(prompt text, prompt token ids); chat template for ``messages`` rows, a ``prompt`` of messages (TRL's
    conversational layout), or with ``chat``."""
    where = f"prompt_id {row.get('prompt_id')!r}"
    tools = row_tools(row.get("tools"), where)
    messages = row.get("messages")
    if messages is None and isinstance(row.get("prompt"), list):
        messages = row["prompt"]
    if messages is None:
        prompt = row.get("prompt")
        if not isinstance(prompt, str):
            raise UserError(f"{where}: the prompt is " + ("null" if prompt is None else
                                                          f"not text but {type(prompt).__name__}"))
        if not chat:
            if tools is not None:
                raise UserError(f"{where}: its tools reach the model through the chat template: add --chat")
            return prompt, tokenizer(prompt)["input_ids"]
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = parse_messages(messages, where)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template (drop --chat, or give plain prompt text)")
    return encode_messages(tokenizer, messages, where, tools)


def encode_messages(tokenizer, messages: list[dict], where: str, tools: list[dict] | None = None) -> tuple[str,
                                                                                                         list[int]]:
    """(text, token ids) of ``messages`` as a prompt: the chat template's rendering with the assistant header
    (the template writes the special tokens it wants; none are added)."""
    text = render_chat(tokenizer, messages, where, generation_prompt=True, tools=tools)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


def render_chat(tokenizer, messages: list[dict], where: str, generation_prompt: bool,
                tools: list[dict] | None = None) -> str:
    """The chat template's text of ``messages`` (with the assistant header after them: ``generation_prompt``)
    and of the functions ``tools`` the model may call (:func:`row_tools`); a template that refuses them
    (Mistral's and Llama 2's raise on a system turn or roles that do not alternate) is one UserError naming
    ``where``.  A template that writes the date sees :data:`TEMPLATE_DATE`, whatever day it is.  The messages'
    null fields are dropped first (:func:`without_nulls`; ``content`` stays, null beside ``tool_calls``)."""
    messages = [{**without_nulls(m), "content": m.get("content")} for m in messages]
    try:
        with _template_clock():
            return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt,
                                                 tokenize=False)
    except Exception as err:  # noqa: BLE001 — jinja2's TemplateError and what a template's own code raises
        raise UserError(f"{where}: the tokenizer's chat template refused these messages: "
                        f"{type(err).__name__}: {err}") from None


def row_tools(value, where: str) -> list[dict] | None:
    """A row's ``tools`` (TRL's tool-calling column): the JSON schemas of the functions the model may call, as a
    list or as JSON text of one, their null fields dropped (:func:`without_nulls`); None for a row without."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: its tools are not JSON ({err})") from None
    if not (isinstance(value, list) and all(isinstance(tool, dict) for tool in value)):
        raise UserError(f"{where}: tools must be a list of function schemas, got {str(value)[:80]}")
    return without_nulls(value)


def without_nulls(value):
    """``value`` with every null-valued key of its dicts dropped, at any depth.  Parquet stores a list of structs
    with one set of fields, so each message (or tool schema) of a table has every field that any has, null where
    it had none: a template would render a tool parameter, a ``name`` or a ``tool_calls`` that was never there."""
    if isinstance(value, dict):
        return {key: without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [without_nulls(item) for item in value]
    return value


def parse_messages(value, where: str) -> list[dict]:
    """A ``messages`` value: a list of messages, or JSON text of one (some datasets store them so), checked."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: its messages are text but not JSON ({err}): messages must be a list of "
                            "{role, content} messages, or JSON text of one") from None
    check_messages(value, where)
    return value


def check_messages(messages, where: str) -> None:
    """Refuse a ``messages`` value that is not a non-empty list of ``{role, content}`` messages (``content`` null
    only beside ``tool_calls``)."""
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and (
                isinstance(m.get("content"), (str, list)) or (m.get("content") is None and m.get("tool_calls")))
            for m in messages)):
        raise UserError(f"{where}: messages must be a non-empty list of {{role, content}} messages, got "
                        f"{str(messages)[:80]}")
