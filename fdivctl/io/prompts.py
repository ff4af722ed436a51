"""Prompts as token ids: plain text with the tokenizer's special tokens, or through its chat template."""

from __future__ import annotations

from fdivctl.errors import UserError


def encode_prompt(tokenizer, row: dict, chat: bool) -> tuple[str, list[int]]:
    """(prompt text, prompt token ids); chat template for ``messages`` rows or with ``chat``."""
    where = f"prompt_id {row.get('prompt_id')!r}"
    messages = row.get("messages")
    if messages is None:
        prompt = row.get("prompt")
        if not isinstance(prompt, str):
            raise UserError(f"{where}: the prompt is " + ("null" if prompt is None else
                                                          f"not text but {type(prompt).__name__}"))
        if not chat:
            return prompt, tokenizer(prompt)["input_ids"]
        messages = [{"role": "user", "content": prompt}]
    else:
        check_messages(messages, where)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template (drop --chat, or give plain prompt text)")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


def check_messages(messages, where: str) -> None:
    """Refuse a ``messages`` value that is not a non-empty list of ``{role, content}`` messages."""
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), (str, list))
            for m in messages)):
        raise UserError(f"{where}: messages must be a non-empty list of {{role, content}} messages, got "
                        f"{str(messages)[:80]}")
