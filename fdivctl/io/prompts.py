"""Prompts as token ids: plain text with the tokenizer's special tokens, or through its chat template."""

from __future__ import annotations

import datetime
import json

from fdivctl.errors import UserError

# The date a chat template sees through ``strftime_now``: the default of Llama 3.1's template, which Llama 3.2's and
# later ones replace by today's ("Today Date: 26 Nov 2026" in their system header).  With today's, one conversation
# would be other tokens on another day, so data read on Tuesday would not match the logit store made on Monday, nor
# a rerun reproduce a run; with this one, every rendering of the same messages is the same text.
TEMPLATE_DATE = datetime.date(2024, 7, 26)


def _template_strftime(format: str) -> str:
    return TEMPLATE_DATE.strftime(format)


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
        return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt,
                                             tokenize=False, strftime_now=_template_strftime)
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
