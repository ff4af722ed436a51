"""Where a frozen distribution comes from during training: a model run under no_grad, or a logit store.

Used by ``distill`` (the teacher) and ``train`` (the reference policy, the
KD teacher).  Both give, for the scored tokens of a teacher-forcing batch
(:meth:`fdivctl.io.sequences.Sequences.batch`), an engine target (full
vocabulary, or top-k + tail) and the log-probs of the tokens themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fdivctl import engine
from fdivctl.errors import UserError
from fdivctl.io.checkpoints import load_causal_lm, load_tokenizer
from fdivctl.io.hashing import tokenizer_hash
from fdivctl.io.lm_head import LMHead
from fdivctl.io.logit_store import LogitStore
from fdivctl.io.sequences import Sequences


def check_same_tokenizer(path: Path, role: str, expected_hash: str, expected_of: str, allow_mismatch: bool) -> None:
    """Refuse ``path`` when its tokenizer hash differs from ``expected_hash`` (the hash of ``expected_of``)."""
    found = tokenizer_hash(load_tokenizer(path, role))
    if found != expected_hash and not allow_mismatch:
        raise UserError(f"tokenizer mismatch: {role} {path} has {found[:16]}…, {expected_of} has "
                        f"{expected_hash[:16]}… (--allow-tokenizer-mismatch skips this check and is unsafe)")


@dataclass
class FrozenModel:
    """A causal LM whose parameters never change: its final hidden states and its head (its token log-probs
    computed ``chunk_size`` token rows at a time, the run's ``--chunk-size``; None: the engine's default)."""

    lm: LMHead
    chunk_size: int | None = None

    @classmethod
    def load(cls, path: Path, role: str, dtype: str, device: str, chunk_size: int | None = None) -> FrozenModel:
        model = load_causal_lm(path, dtype, device, role)
        model.requires_grad_(False)
        model.eval()
        return cls(LMHead.of(model, f"{role} {path}"), chunk_size)

    @property
    def weight(self) -> torch.Tensor:
        return self.lm.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.lm.bias

    @property
    def softcap(self) -> float | None:
        return self.lm.softcap

    @torch.no_grad()
    def hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.lm.hidden(batch)

    def target(self, hidden: torch.Tensor, vocab: str = "strict") -> engine.TeacherHead:
        return engine.TeacherHead(hidden, self.weight, self.bias, vocab=vocab, softcap=self.softcap)

    @torch.no_grad()
    def token_logprobs(self, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
        return engine.token_outputs(hidden, self.weight, bias=self.bias, token_ids=tokens, temperature=temperature,
                                    chunk_size=self.chunk_size, softcap=self.softcap).logprob


def _stored(store: LogitStore, seqs: Sequences, row: int):
    stored = store.sequence(seqs.prompt_ids[row], seqs.sample_idx[row])
    start = stored.completion_start
    if stored.token_ids[start:].tolist() != seqs.completion_tokens[row].tolist():
        raise UserError(
            f"logit store {store.directory} was made for other sequences: the tokens of prompt_id "
            f"{seqs.prompt_ids[row]!r} sample_idx {seqs.sample_idx[row]} differ from the data's"
        )
    return stored, start


def store_target(store: LogitStore, seqs: Sequences, rows: list[int], tail: str, device) -> engine.TopK:
    """The stored top-k + tail of the completion tokens of ``rows``, in batch order."""
    parts: dict[str, list[torch.Tensor]] = {"ids": [], "logprobs": [], "log_tail": []}
    for row in rows:
        stored, start = _stored(store, seqs, row)
        parts["ids"].append(stored.ids[start:])
        parts["logprobs"].append(stored.logprobs[start:].float())
        parts["log_tail"].append(stored.log_tail[start:])
    cat = {k: torch.cat(v).to(device) for k, v in parts.items()}
    return engine.TopK(cat["ids"], cat["logprobs"], cat["log_tail"], temperature=store.temperature, tail=tail)


def store_token_logprobs(store: LogitStore, seqs: Sequences, rows: list[int], device) -> torch.Tensor:
    """The stored exact log-probs (at the store's temperature) of the completion tokens of ``rows``."""
    parts = []
    for row in rows:
        stored, start = _stored(store, seqs, row)
        parts.append(stored.token_logprob[start:].float())
    return torch.cat(parts).to(device)
