"""Sampling parameters and one generated completion, shared by every backend."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from fdivctl.errors import UserError
from fdivctl.io.prompts import encode_prompt


@dataclass
class SamplingOptions:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    max_new_tokens: int = 256
    seed: int = 0
    stop: list[str] = field(default_factory=list)

    def check(self) -> None:
        if self.n < 1:
            raise UserError(f"--n must be ≥ 1, got {self.n}")
        if self.temperature < 0:
            raise UserError(f"--temperature must be ≥ 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.max_new_tokens < 1:
            raise UserError("--top-k must be ≥ 0 and --max-new-tokens ≥ 1")
        if any(not text for text in self.stop):
            raise UserError("--stop '': an empty stop string would end every completion at its first token")
        if self.temperature == 0 and self.n > 1:
            raise UserError("--temperature 0 (greedy) gives one distinct sample: use --n 1")

    def as_record(self) -> dict:
        return asdict(self)


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each generated token under the sampling temperature
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


def encode_prompts(tokenizer, rows: list[dict], chat: bool, context: int | None,
                   model: str) -> list[tuple[str, list[int]]]:
    """Each prompt row's (text, token ids) (:func:`fdivctl.io.prompts.encode_prompt`), refusing before sampling a
    prompt of no tokens (a causal model has nothing to condition its first token on: vLLM refuses one too, and
    every later stage refuses the sequence) and one that leaves no room in the ``context`` of ``model`` (its name,
    for the message) for one generated token."""
    encoded = [encode_prompt(tokenizer, row, chat) for row in rows]
    for row, (_, ids) in zip(rows, encoded):
        if not ids:
            raise UserError(f"prompt_id {row['prompt_id']!r}: the prompt is no tokens (empty text, and the "
                            "tokenizer adds no BOS): there is nothing to sample its first token from; drop the row")
        if context is not None and len(ids) >= context:
            raise UserError(f"prompt_id {row['prompt_id']!r} has {len(ids)} tokens: it fills the {context}-token "
                            f"context of the {model}, leaving no room to generate; drop or shorten such prompts")
    return encoded


def completion_budgets(prompts: list[list[int]], max_new_tokens: int, context: int | None) -> list[int]:
    """How many tokens each prompt may generate: ``max_new_tokens``, cut where prompt + completion reach the
    model's context (such a completion ends with finish_reason ``length``, as vLLM ends one at ``max_model_len``)."""
    budgets = [max_new_tokens if context is None else min(max_new_tokens, context - len(p)) for p in prompts]
    if budgets and min(budgets) < 1:
        raise ValueError("a prompt fills the model's context: encode_prompts refuses it before sampling")
    return budgets
