"""What one GRPO-family update reads: scored rollouts, the frozen policies it compares with, and the credit.

:class:`ScoredRollouts` holds a scored rollouts table in memory;
:class:`ReferencePolicy` serves a frozen policy's token log-probs and targets
(a model under no_grad, or a logit store); :class:`ReferenceSamples` are
DPH-RL's stored reference samples; :class:`Replay` RECAP's replayed tables;
:class:`Credit` is what each response and token is credited with
(checkpointed by staged runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from fdivctl import engine
from fdivctl.divergences import Divergence
from fdivctl.errors import UserError
from fdivctl.io.logit_store import LogitStore
from fdivctl.io.sequences import Sequences, sampled_logprobs, sequences_from_table
from fdivctl.io.tables import is_int_list, require_columns, require_finite
from fdivctl.schedules.replay_weights import RecapWeights
from fdivctl.stages.signals import FrozenModel, store_target, store_token_logprobs


@dataclass
class ScoredRollouts:
    """Scored rollouts in memory, one group index per distinct ``prompt_id``."""

    seqs: Sequences
    old_logprobs: list[np.ndarray]
    rewards: torch.Tensor  # float32 [S]
    correct: np.ndarray  # bool [S]
    groups: torch.Tensor  # int64 [S]
    lengths: torch.Tensor  # int64 [S], completion tokens
    spans: list[list[tuple[int, int, int]]] | None = None  # TRACE: (start, end, kind) per row (objectives/trace.py)
    privileged: Sequences | None = None  # TRACE: the same completions after each row's privileged prompt

    @classmethod
    def from_table(cls, table: pa.Table, path: Path, min_group: int = 2) -> ScoredRollouts:
        if "reward" not in table.column_names:
            raise UserError(f"{path}: no reward column: score the rollouts first (fdivctl score)")
        require_columns(table, path, ["prompt_id", "sample_idx", "prompt_token_ids", "completion_token_ids",
                                      "completion_logprobs"], " (rollouts from `fdivctl rollout`, then scored)")
        if not is_int_list(table.schema.field("completion_token_ids").type):
            raise UserError(f"{path}: completion_token_ids must be list<int>")
        require_finite(path, "reward", table.column("reward"))
        rewards = table.column("reward").to_pylist()
        seqs = sequences_from_table(table, path)
        old = sampled_logprobs(table, path, seqs)
        index: dict[str, int] = {}
        groups = torch.tensor([index.setdefault(pid, len(index)) for pid in seqs.prompt_ids], dtype=torch.long)
        sizes = torch.bincount(groups)
        if min_group > 1 and bool((sizes < min_group).any()):
            small = list(index)[int((sizes < min_group).nonzero()[0])]
            raise UserError(f"{path}: prompt_id {small!r} has {int(sizes.min())} sample(s); the GRPO family needs "
                            f"groups of at least {min_group} samples per prompt (rollout --n)")
        correct = (np.asarray(table.column("correct").to_pylist(), dtype=bool) if "correct" in table.column_names
                   else np.asarray(rewards) > 0)
        lengths = torch.tensor([len(t) for t in seqs.completion_tokens], dtype=torch.long)
        return cls(seqs, old, torch.tensor(rewards, dtype=torch.float32), correct, groups, lengths)

    def __len__(self) -> int:
        return len(self.seqs)


class ReferencePolicy:
    """Log-probs and closed-form targets of the frozen reference (a model, or a logit store for staged runs)."""

    def __init__(self, model: FrozenModel | None, store: LogitStore | None, tail: str):
        self.model, self.store, self.tail = model, store, tail

    def token_logprobs(self, data: ScoredRollouts, rows: list[int], batch: dict, temperature: float) -> torch.Tensor:
        if self.model is not None:
            return self.model.token_logprobs(self.model.hidden(batch), batch["token"], temperature)
        if abs(self.store.temperature - temperature) > 1e-6:
            raise UserError(f"--ref-logits store is at temperature {self.store.temperature}, the rollouts' "
                            f"log-probs at {temperature}: sample estimators need the same (or use --div-estimator "
                            "full)")
        return store_token_logprobs(self.store, data.seqs, rows, batch["token"].device)

    def target(self, data: ScoredRollouts, rows: list[int], batch: dict) -> engine.Target:
        if self.model is not None:
            return self.model.target(self.model.hidden(batch))
        return store_target(self.store, data.seqs, rows, self.tail, batch["token"].device)


@dataclass
class ReferenceSamples:
    """DPH-RL's stored reference samples (correct π_0 completions of D_pef prompts) with their π_0 log-probs."""

    seqs: Sequences
    logprobs: list[np.ndarray]
    temperature: float


def token_index(data: ScoredRollouts, rows: list[int]) -> torch.Tensor:
    """Where the tokens of ``rows`` sit among all responses' tokens concatenated in row order."""
    starts = torch.cumsum(data.lengths, 0) - data.lengths
    return torch.cat([torch.arange(int(starts[r]), int(starts[r]) + int(data.lengths[r])) for r in rows])


@dataclass
class Credit:
    """What each response (and token) of a batch is credited with: its advantage, the weight of its divergence
    term (APO's DADS; 1 otherwise), for DGPO each token's share of the advantage, and for TRACE each token's
    route (0 GRPO, 1 forward KL, 2 reverse KL; objectives/trace.py), and with ``--tis-cap`` each token's
    log-prob under the trainer's policy before the update and its truncated importance weight — per-token values
    concatenated."""

    advantages: torch.Tensor  # [S]
    div_scale: torch.Tensor  # [S]
    token_scale: torch.Tensor | None = None  # [Σ lengths]
    token_route: torch.Tensor | None = None  # int8 [Σ lengths]
    token_old: torch.Tensor | None = None  # float32 [Σ lengths]: log π_old recomputed by the trainer
    token_tis: torch.Tensor | None = None  # float32 [Σ lengths]: min(π_old / π_sampler, C)

    def state(self) -> dict:
        return {"advantages": self.advantages, "div_scale": self.div_scale, "token_scale": self.token_scale,
                "token_route": self.token_route, "token_old": self.token_old, "token_tis": self.token_tis}

    def old_logprobs(self, data: ScoredRollouts, rows: list[int]) -> torch.Tensor | None:
        """The trainer's recomputed log π_old of every token of ``rows`` (None: the sampler's are the ratio's)."""
        return None if self.token_old is None else self.token_old[token_index(data, rows)]

    def tis_weights(self, data: ScoredRollouts, rows: list[int]) -> torch.Tensor | None:
        """The truncated importance weight of every token of ``rows`` (None without ``--tis-cap``)."""
        return None if self.token_tis is None else self.token_tis[token_index(data, rows)]

    def token_advantages(self, data: ScoredRollouts, rows: list[int]) -> torch.Tensor:
        """The advantage of every token of ``rows``, concatenated."""
        adv = self.advantages[rows].repeat_interleave(data.lengths[rows])
        return adv if self.token_scale is None else adv * self.token_scale[token_index(data, rows)]

    def routes(self, data: ScoredRollouts, rows: list[int]) -> torch.Tensor:
        """TRACE's route of every token of ``rows`` (all 0 without routing)."""
        if self.token_route is None:
            return torch.zeros(int(data.lengths[rows].sum()), dtype=torch.int8)
        return self.token_route[token_index(data, rows)]


@dataclass
class Replay:
    """RECAP's replayed general-domain objectives: one table of sequences each, with their weighting."""

    sets: list[Sequences]
    divergence: Divergence | None  # None: cross-entropy (SFT)
    coef: float
    batch_size: int
    weights: RecapWeights | None  # None: fixed weights (all 1)
