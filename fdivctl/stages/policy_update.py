"""One policy-gradient update of the GRPO family on scored rollouts — shared by staged and online ``train``.

Given scored rollouts (``prompt_token_ids``, ``completion_token_ids``, the
old policy's ``completion_logprobs``, ``reward``) grouped by ``prompt_id``:

1. rewards are shaped (DAPO overlong penalty; the divergence to the
   reference when it is placed in the reward), then turned into group
   advantages (:mod:`fdivctl.objectives.grpo`);
2. with dynamic sampling, groups whose rewards are all equal are dropped;
3. for ``ppo_epochs`` passes, the kept responses are shuffled (seeded) into
   minibatches, one optimizer step each, computed in micro-batches through
   the chunked engine (per-token log-prob, entropy and, for the ``full``
   estimator, the closed-form divergence to the reference);
4. with DPH-RL, each step also adds η · L_pef on a batch of stored reference
   samples (:mod:`fdivctl.objectives.dph`); with ``--replay``, each step also
   adds each replayed general-domain objective on a batch of its rows, weighted
   fixed or by RECAP (:mod:`fdivctl.schedules.replay_weights`).

The same :class:`PolicyUpdate` serves ``train --rollouts`` and each iteration
of ``train --prompts``, so both give the same update for the same rollouts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from fdivctl import divergences, engine
from fdivctl.divergences import Divergence, sample_divergence
from fdivctl.errors import UserError
from fdivctl.io.logit_store import LogitStore
from fdivctl.io.sequences import Sequences, sequences_from_table
from fdivctl.io.tables import is_int_list, require_columns
from fdivctl.objectives import apo, dgpo, dph, fdpg, grpo, kd, rlad, trace
from fdivctl.schedules.anneal import linear_anneal
from fdivctl.schedules.kl_control import KLCoefficient
from fdivctl.schedules.replay_weights import RecapWeights
from fdivctl.stages.signals import FrozenModel, scored_hidden, store_target, store_token_logprobs
from fdivctl.training.loop import LoopOptions, Trainer, batches_for_step

ESTIMATORS = ("k1", "k2", "k3", "abs", "k3+", "full")
PLACEMENTS = ("loss", "reward")
KD_ESTIMATORS = ("k2", "k3", "full")
KD_MASKS = ("all", "incorrect", "correct")
REPLAY_WEIGHTINGS = ("fixed", "recap")

#: per algorithm: clip_low, clip_high, loss_agg, std_norm, dynamic_sampling, overlong buffer (share of max length)
PRESETS: dict[str, dict] = {
    "grpo": dict(clip_low=0.2, clip_high=0.2, loss_agg="seq-mean-token-mean", std_norm=True, dynamic_sampling=False,
                 overlong_penalty=0.0),
    "drgrpo": dict(clip_low=0.2, clip_high=0.2, loss_agg="seq-mean-token-sum", std_norm=False,
                   dynamic_sampling=False, overlong_penalty=0.0),
    "dapo": dict(clip_low=0.2, clip_high=0.28, loss_agg="token-mean", std_norm=True, dynamic_sampling=True,
                 overlong_penalty=0.2),
    "dph": dict(clip_low=0.2, clip_high=0.28, loss_agg="token-mean", std_norm=True, dynamic_sampling=False,
                overlong_penalty=0.0),
}
# RLAD (ratio against the teacher–old-policy mixture), DGPO (token-redistributed advantage), f-DPG (advantage
# from f′ toward a target distribution) and TRACE (span-routed KL) keep GRPO's settings
PRESETS.update({algo: PRESETS["grpo"] for algo in ("rlad", "dgpo", "fdpg", "trace")})


@dataclass
class RLOptions:
    """Options of the GRPO family; ``None`` takes the ``algo``'s preset (:data:`PRESETS`)."""

    algo: str = "grpo"
    clip_low: float | None = None
    clip_high: float | None = None
    loss_agg: str | None = None
    std_norm: bool | None = None
    dynamic_sampling: bool | None = None
    overlong_penalty: float | None = None  # buffer as a share of the maximum length (0: off)
    entropy_coef: float = 0.0
    ppo_epochs: int = 1
    minibatch_size: int | None = None  # responses per optimizer step; None: all of them
    micro_batch_size: int = 8
    temperature: float | None = None  # of the log-probs; None: the rollouts' sampling temperature
    divergence: str = "none"
    div_coef: float = 0.04
    div_estimator: str = "k3"
    div_in: str = "loss"
    ref_model: Path | None = None
    ref_logits: Path | None = None
    tail: str = "tail"
    partition_dir: Path | None = None  # DPH-RL
    eta: float = 0.1
    pef_batch_size: int = 8
    teacher: Path | None = None  # KDRL
    teacher_logits: Path | None = None
    kd_coef: float = 5e-3
    kd_anneal: float | None = None  # the coefficient at the end of the run (linear); None: constant
    kd_estimator: str = "k2"
    kd_mask: str = "all"
    mix_lambda: float = 0.5  # RLAD
    div_coef_schedule: str = "constant"  # constant | akl (FG-ExPO) | pid (SAFE); schedules/kl_control.py
    akl_center: float = 0.5
    akl_sharpness: float = 10.0
    kl_threshold: float = 0.3
    target_entropy: float = 2.0
    dads: bool = False  # APO (objectives/apo.py)
    stcr: bool = False
    dgpo_lambda: float = 0.5  # DGPO (objectives/dgpo.py)
    fdpg_target: str = "ref*exp(r/beta)"  # f-DPG (objectives/fdpg.py)
    beta: float = 0.1
    key_kl_coef: float = 1.0  # TRACE (objectives/trace.py)
    error_kl_coef: float = 0.0
    kl_warmup: int | None = None
    replay: list[Path] = field(default_factory=list)  # RECAP (schedules/replay_weights.py)
    replay_objective: str = "sft"
    replay_coef: float = 1.0
    replay_batch_size: int = 8
    replay_weighting: str = "fixed"
    recap_window: int = 4
    recap_temperature: float = 1.0
    dtype: str = "auto"
    device: str = "auto"
    allow_tokenizer_mismatch: bool = False
    loop: LoopOptions = field(default_factory=LoopOptions)

    def resolve(self) -> RLOptions:
        """Fill the preset's values in and check every option; returns self."""
        if self.algo not in PRESETS:
            raise UserError(f"--algo {self.algo!r}; valid here: {', '.join(PRESETS)}")
        for key, value in PRESETS[self.algo].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.loss_agg not in grpo.LOSS_AGGS:
            raise UserError(f"--loss-agg {self.loss_agg!r}; valid: {', '.join(grpo.LOSS_AGGS)}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise UserError("--clip-low must lie in [0, 1) and --clip-high be ≥ 0")
        if self.ppo_epochs < 1 or self.micro_batch_size < 1 or (self.minibatch_size or 1) < 1:
            raise UserError("--ppo-epochs, --micro-batch-size and --minibatch-size must be ≥ 1")
        if not 0 <= self.overlong_penalty < 1:
            raise UserError("--overlong-penalty is the penalty zone as a share of the maximum length, in [0, 1)")
        if self.div_estimator not in ESTIMATORS:
            raise UserError(f"--div-estimator {self.div_estimator!r}; valid: {', '.join(ESTIMATORS)}")
        if self.div_in not in PLACEMENTS:
            raise UserError(f"--div-in {self.div_in!r}; valid: {', '.join(PLACEMENTS)}")
        if self.temperature is not None and not self.temperature > 0:
            raise UserError("--temperature must be > 0")
        if (self.algo == "dph") != (self.partition_dir is not None):
            raise UserError("--algo dph needs --partition-dir (from `train --algo dph --partition`), and only it")
        if self.algo == "dph" and self.divergence == "none":
            self.divergence = "fkl"
        if self.algo == "dph" and (self.eta < 0 or self.pef_batch_size < 1):
            raise UserError("--eta must be ≥ 0 and --pef-batch-size ≥ 1")
        if self.teacher is not None and self.teacher_logits is not None:
            raise UserError("give one teacher: --teacher MODEL or --teacher-logits STORE")
        if self.algo == "rlad" and not self.has_teacher:
            raise UserError("--algo rlad needs a teacher: --teacher MODEL (or, staged, --teacher-logits STORE)")
        if not 0 <= self.mix_lambda <= 1:
            raise UserError("--mix-lambda must lie in [0, 1]")
        if self.kd_estimator not in KD_ESTIMATORS:
            raise UserError(f"--kd-estimator {self.kd_estimator!r}; valid: {', '.join(KD_ESTIMATORS)}")
        if self.kd_mask not in KD_MASKS:
            raise UserError(f"--kd-mask {self.kd_mask!r}; valid: {', '.join(KD_MASKS)}")
        if self.kd_coef < 0 or (self.kd_anneal is not None and self.kd_anneal < 0):
            raise UserError("--kd-coef and --kd-anneal must be ≥ 0")
        if self.algo == "dgpo" and self.divergence != "none":
            raise UserError("--algo dgpo has no KL penalty: the reference only guides the advantage; drop "
                            "--divergence")
        if self.algo == "fdpg":
            if self.fdpg_target not in fdpg.TARGETS:
                raise UserError(f"--target {self.fdpg_target!r}; valid: {', '.join(fdpg.TARGETS)}")
            if not self.beta > 0:
                raise UserError("--beta must be > 0")
            if self.divergence == "none":
                self.divergence = "fkl"
        if not 0 <= self.dgpo_lambda <= 1:
            raise UserError("--dgpo-lambda must lie in [0, 1]")
        self._check_trace()
        self._check_replay()
        self.coefficient().check()
        if self.div_coef_schedule != "constant" and self.regularizer() is None:
            raise UserError(f"--div-coef-schedule {self.div_coef_schedule} sets the coefficient of --divergence: "
                            "give one (e.g. --divergence rkl)")
        if self.dads and (self.regularizer() is None or self.div_in != "loss"):
            raise UserError("--dads weights the divergence term in the loss: give --divergence (e.g. rkl) with "
                            "--div-in loss")
        if self.div_coef_schedule == "pid" and self.div_in != "loss":
            raise UserError("--div-coef-schedule pid controls the divergence in the loss: use --div-in loss")
        if self.kd_estimator == "full" and self.div_estimator == "full" and self.divergence != "none" \
                and self.kd_on:
            raise UserError("--kd-estimator full and --div-estimator full both need a full-vocabulary target in one "
                            "pass: use a sample estimator (k2, k3) for one of them")
        return self

    def _check_trace(self) -> None:
        if self.key_kl_coef < 0 or self.error_kl_coef < 0:
            raise UserError("--key-kl-coef and --error-kl-coef must be ≥ 0")
        if self.kl_warmup is not None and self.kl_warmup < 1:
            raise UserError("--kl-warmup must be ≥ 1 (optimizer steps over which the KL channel fades)")
        if self.algo == "trace" and self.divergence != "none" and self.div_estimator == "full":
            raise UserError("--algo trace takes the full-vocabulary teacher target in its one pass: regularize "
                            "with a sample estimator (--div-estimator k3) or drop --divergence")

    def _check_replay(self) -> None:
        if self.replay_weighting not in REPLAY_WEIGHTINGS:
            raise UserError(f"--replay-weighting {self.replay_weighting!r}; valid: {', '.join(REPLAY_WEIGHTINGS)}")
        if not self.replay:
            if self.replay_weighting != "fixed":
                raise UserError("--replay-weighting recap weighs replayed objectives: give --replay FILE")
            return
        if self.replay_coef < 0 or self.replay_batch_size < 1:
            raise UserError("--replay-coef must be ≥ 0 and --replay-batch-size ≥ 1")
        if self.recap_window < 2 or not self.recap_temperature > 0:
            raise UserError("--recap-window must be ≥ 2 and --recap-temperature > 0")
        if self.replay_divergence() is not None and self.ref_logits is not None:
            raise UserError(f"--replay-objective {self.replay_objective} reads the reference on the replay rows: "
                            "give --ref-model (a --ref-logits store holds only the rollouts)")

    def replay_divergence(self) -> Divergence | None:
        """The replayed objective: None for ``sft`` (cross-entropy), else a registry divergence to the reference."""
        if self.replay_objective == "sft":
            return None
        try:
            return divergences.parse(self.replay_objective)
        except ValueError as err:
            raise UserError(f"--replay-objective: sft or a divergence; {err}") from None

    @property
    def has_teacher(self) -> bool:
        """Whether a teacher is given (``--teacher`` or ``--teacher-logits``): KDRL's KD term, or RLAD's ratio."""
        return self.teacher is not None or self.teacher_logits is not None

    @property
    def kd_on(self) -> bool:
        """Whether KDRL's KD term is in the loss: a teacher is given and it is not RLAD's or TRACE's."""
        return self.has_teacher and self.algo not in ("rlad", "trace")

    @property
    def needs_reference(self) -> bool:
        """Whether the update reads a reference policy: a regularizer, DGPO's guidance, f-DPG's target, or a
        replayed divergence."""
        return self.algo in ("dgpo", "fdpg") or (self.regularizer() is not None and self.algo != "dph") or \
            (bool(self.replay) and self.replay_divergence() is not None)

    def coefficient(self) -> KLCoefficient:
        """The regularizer's coefficient schedule (``--div-coef-schedule``)."""
        return KLCoefficient(self.div_coef_schedule, self.div_coef, self.akl_center, self.akl_sharpness,
                             self.kl_threshold, self.target_entropy)

    def parsed_divergence(self) -> Divergence | None:
        """``--divergence`` parsed; None for ``none``."""
        if self.divergence == "none":
            return None
        try:
            return divergences.parse(self.divergence)
        except ValueError as err:
            raise UserError(f"--divergence: {err}") from None

    def regularizer(self) -> Divergence | None:
        """The divergence to the reference policy (for dph: the D_pef generator); None for ``none`` and for
        fdpg, whose ``--divergence`` is the one to its target distribution."""
        div = self.parsed_divergence()
        if div is None or self.algo == "fdpg":
            return None
        if self.algo != "dph" and self.div_estimator in ("k2", "abs", "k3+") and div.name != "rkl":
            raise UserError(f"--div-estimator {self.div_estimator} estimates KL(π‖ref) only: use --divergence rkl, "
                            f"or k1, k3 or full for {div.name}")
        return div


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
        rewards = table.column("reward").to_pylist()
        if any(r is None or not np.isfinite(r) for r in rewards):
            raise UserError(f"{path}: the reward column has null or non-finite values")
        seqs = sequences_from_table(table, path)
        old = [np.asarray(v if v is not None else [], dtype=np.float32)
               for v in table.column("completion_logprobs").to_pylist()]
        for row, (lp, tokens) in enumerate(zip(old, seqs.completion_tokens)):
            if len(lp) != len(tokens):
                raise UserError(f"{path}: row {row} has {len(tokens)} completion tokens but {len(lp)} log-probs")
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
    route (0 GRPO, 1 forward KL, 2 reverse KL; objectives/trace.py) — per-token values concatenated."""

    advantages: torch.Tensor  # [S]
    div_scale: torch.Tensor  # [S]
    token_scale: torch.Tensor | None = None  # [Σ lengths]
    token_route: torch.Tensor | None = None  # int8 [Σ lengths]

    def state(self) -> dict:
        return {"advantages": self.advantages, "div_scale": self.div_scale, "token_scale": self.token_scale,
                "token_route": self.token_route}

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
class StepScale:
    """The constants of one optimizer step that every micro-batch of it needs."""

    n_tokens: int  # completion tokens of the step's responses
    n_seqs: int
    kd_coef: float = 0.0  # KDRL (annealed)
    div_coef: float = 0.0  # the regularizer's (scheduled) coefficient
    anneal: float = 1.0  # TRACE's a_t
    key_tokens: int = 1  # TRACE: tokens routed to each KL (≥ 1, the denominators of their logged means)
    error_tokens: int = 1
    task_weight: float = 1.0  # RECAP's weight of the RL objective


@dataclass
class Replay:
    """RECAP's replayed general-domain objectives: one table of sequences each, with their weighting."""

    sets: list[Sequences]
    divergence: Divergence | None  # None: cross-entropy (SFT)
    coef: float
    batch_size: int
    weights: RecapWeights | None  # None: fixed weights (all 1)


class PolicyUpdate:
    """The model being trained, its frozen reference, and the update rule (see the module docstring)."""

    def __init__(self, model, tokenizer, opts: RLOptions, reference: ReferencePolicy | None,
                 reference_samples: ReferenceSamples | None = None, teacher: ReferencePolicy | None = None,
                 replay: Replay | None = None):
        self.model, self.opts = model, opts
        self.decoder, self.head = model.get_decoder(), model.get_output_embeddings()
        self.device = self.head.weight.device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.regularizer = opts.regularizer()
        self.reference = reference
        self.samples = reference_samples
        self.teacher = teacher
        self.replay = replay
        self.coefficient = opts.coefficient()
        if opts.needs_reference and reference is None:
            raise UserError(f"--algo {opts.algo} with --divergence {opts.divergence} needs a reference: --ref-model "
                            "DIR or --ref-logits DIR")

    # -- step 1-2: advantages -------------------------------------------------------------------------------------
    def advantages(self, data: ScoredRollouts, temperature: float, max_length: int | None) -> tuple[Credit,
                                                                                                    list[int], dict]:
        """(the batch's credit, the responses kept, figures)."""
        opts = self.opts
        rewards = data.rewards.clone()
        correct = torch.from_numpy(data.correct)
        figures: dict[str, float] = {}
        if opts.overlong_penalty and max_length:
            buffer = max(1, round(opts.overlong_penalty * max_length))
            rewards += grpo.overlong_penalty(data.lengths, max_length, buffer)
        if self.regularizer is not None and opts.div_in == "reward" and opts.algo != "dph":
            per_response = self._per_response(data, lambda rows, batch, hidden: self._divergence(
                data, rows, batch, hidden, temperature, self._old_logprobs(data, rows)))
            figures["divergence"] = float(per_response.sum() / data.lengths.sum())
            rewards -= self.div_coef(data) * per_response
        if opts.algo == "fdpg":
            advantages = self._fdpg_advantages(data, rewards, correct, temperature, figures)
        else:
            advantages = grpo.group_advantages(rewards, data.groups, opts.std_norm)
        if opts.stcr:
            scale = apo.stcr_scale(data.lengths, correct, data.groups)
            figures["stcr_penalized"] = float((scale > 1).sum())
            advantages = advantages * scale
        div_scale = apo.divergence_scale(advantages, correct, data.groups) if opts.dads \
            else torch.ones(len(data))
        credit = Credit(advantages, div_scale, self._dgpo_scale(data, temperature) if opts.algo == "dgpo" else None,
                        self._trace_routes(data, figures) if opts.algo == "trace" else None)
        keep = torch.ones(len(data), dtype=torch.bool)
        if opts.dynamic_sampling:
            keep = ~grpo.equal_reward_groups(data.rewards, data.groups)
        keep &= data.lengths > 0
        figures["groups_kept"] = float(len(set(data.groups[keep].tolist())))
        figures["groups_dropped"] = float(len(set(data.groups.tolist())) - figures["groups_kept"])
        return credit, keep.nonzero().squeeze(-1).tolist(), figures

    def state_dict(self) -> dict:
        """The update rule's own state, checkpointed with the run: the coefficient controller, RECAP's history."""
        state = {"kl_control": self.coefficient.state_dict()}
        if self.replay is not None and self.replay.weights is not None:
            state["replay_weights"] = self.replay.weights.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` from a checkpoint's extra state (keys it lacks keep their fresh state)."""
        if "kl_control" in state:
            self.coefficient.load_state_dict(state["kl_control"])
        if "replay_weights" in state and self.replay is not None and self.replay.weights is not None:
            self.replay.weights.load_state_dict(state["replay_weights"])

    def div_coef(self, data: ScoredRollouts) -> float:
        """The regularizer's coefficient for the next update (``--div-coef-schedule``)."""
        return self.coefficient.value(float(data.correct.mean()) if len(data) else 0.0)

    @torch.no_grad()
    def _per_response(self, data: ScoredRollouts, per_token, reduce: bool = True) -> torch.Tensor:
        """``per_token(rows, batch, hidden)`` over all responses in micro-batches under the current policy, summed
        per response (``reduce``) or concatenated per token."""
        parts = []
        for start in range(0, len(data), self.opts.micro_batch_size):
            rows = list(range(start, min(start + self.opts.micro_batch_size, len(data))))
            batch = self._batch(data.seqs, rows)
            values = per_token(rows, batch, scored_hidden(self.decoder, batch)).float().cpu()
            if reduce:
                values = torch.zeros(len(rows)).index_add_(
                    0, torch.arange(len(rows)).repeat_interleave(data.lengths[rows]), values)
            parts.append(values)
        return torch.cat(parts) if parts else torch.zeros(0)

    def _old_logprobs(self, data: ScoredRollouts, rows: list[int]) -> torch.Tensor:
        """The sampling policy's log-probs of the tokens of ``rows``, concatenated, on the model's device."""
        return torch.from_numpy(np.concatenate([data.old_logprobs[r] for r in rows])).to(self.device)

    def _fdpg_advantages(self, data, rewards, correct, temperature, figures) -> torch.Tensor:
        """f-DPG: ``−(f′(u) − b)`` per response toward the target distribution (objectives/fdpg.py)."""
        ref = self._per_response(data, lambda rows, batch, hidden: self.reference.token_logprobs(
            data, rows, batch, temperature))
        policy = torch.tensor([float(lp.sum()) for lp in data.old_logprobs], dtype=torch.float64)
        target = fdpg.log_target(ref, rewards, correct, self.opts.fdpg_target, self.opts.beta)
        advantages, log_u = fdpg.advantages(self.opts.parsed_divergence(), policy, target, data.groups)
        figures["log_u"] = float(log_u.mean())
        return advantages

    def _trace_routes(self, data: ScoredRollouts, figures: dict) -> torch.Tensor:
        """TRACE: each token's route from the rollouts' spans (objectives/trace.py)."""
        if data.spans is None:
            raise UserError("--algo trace needs the rollouts' spans column")
        routes = trace.token_routes(data.spans, data.lengths.tolist(), data.correct, self.opts.error_kl_coef > 0)
        figures["key_tokens"] = float((routes == trace.KEY).sum())
        figures["error_tokens"] = float((routes == trace.ERROR).sum())
        return routes

    def _dgpo_scale(self, data: ScoredRollouts, temperature: float) -> torch.Tensor:
        """DGPO: each token's share of its response's advantage (objectives/dgpo.py)."""
        hellinger = divergences.get("hellinger")
        outputs: list[torch.Tensor] = []

        def guidance(rows, batch, hidden):
            out = engine.token_outputs(hidden, self.head.weight, bias=getattr(self.head, "bias", None),
                                       entropy=True, target=self.reference.target(data, rows, batch),
                                       divergence=hellinger, temperature=temperature)
            outputs.append(out.entropy.float().cpu())
            return out.divergence

        deviation = self._per_response(data, guidance, reduce=False)
        entropy = torch.cat(outputs) if outputs else torch.zeros(0)
        return dgpo.token_scale(deviation, entropy, data.lengths, self.head.weight.shape[0], self.opts.dgpo_lambda)

    # -- step 3-4: minibatch steps --------------------------------------------------------------------------------
    def steps(self, data: ScoredRollouts, kept: list[int], seed: int) -> list[list[int]]:
        """The responses of each optimizer step: ``ppo_epochs`` seeded shuffles of ``kept`` into minibatches."""
        size = self.opts.minibatch_size or max(1, len(kept))
        plan = []
        for epoch in range(self.opts.ppo_epochs):
            order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            plan += [[kept[i] for i in order[s : s + size]] for s in range(0, len(order), size)]
        return plan

    def step(self, trainer: Trainer, data: ScoredRollouts, credit: Credit, rows: list[int],
             temperature: float) -> dict:
        """One optimizer step on the responses ``rows`` (plus D_pef's term for DPH-RL and the replayed
        objectives)."""
        opts = self.opts
        replay_weights = self._replay_weights()
        routes = credit.routes(data, rows)
        scale = StepScale(int(data.lengths[rows].sum()), len(rows),
                          kd_coef=linear_anneal(opts.kd_coef, opts.kd_anneal, trainer.progress),
                          div_coef=self.div_coef(data), anneal=trace.kl_anneal(trainer.step, opts.kl_warmup),
                          key_tokens=max(1, int((routes == trace.KEY).sum())),
                          error_tokens=max(1, int((routes == trace.ERROR).sum())), task_weight=replay_weights[0])
        size = opts.micro_batch_size
        micro = [self._micro(data, credit, rows[s : s + size], scale, temperature)
                 for s in range(0, len(rows), size)]
        if self.samples is not None and len(self.samples.seqs) and opts.eta:
            micro.append(self._pef_micro(trainer.step))
        if self.replay is not None:
            micro += [self._replay_micro(k, trainer.step, w) for k, w in enumerate(replay_weights[1:])]
        figures = trainer.update(micro)
        if opts.kd_on:
            figures["kd_coef"] = scale.kd_coef
        if opts.algo == "trace":
            figures["kl_anneal"] = scale.anneal
        if opts.div_coef_schedule != "constant":
            figures["div_coef"] = scale.div_coef
            self.coefficient.update(figures.get("divergence", 0.0), figures["entropy"], float(data.rewards.mean()))
        if self.replay is not None:
            self._record_replay(figures, replay_weights)
        return figures

    # -- RECAP: replayed objectives -------------------------------------------------------------------------------
    def _replay_weights(self) -> list[float]:
        """The weights of [the RL task, each replayed objective] for the next step (all 1 without RECAP)."""
        if self.replay is None:
            return [1.0]
        if self.replay.weights is None:
            return [1.0] * (1 + len(self.replay.sets))
        return self.replay.weights.weights()

    def _record_replay(self, figures: dict, weights: list[float]) -> None:
        """Log the step's weights and feed RECAP the signals measured in it: the task's NLL of positive-advantage
        tokens (when the step had any) and each replayed loss."""
        positive = figures.pop("positive_tokens", 0.0)
        task_signal = figures.pop("positive_nll", 0.0) / positive if positive else None
        figures["weight_task"] = weights[0]
        for k, weight in enumerate(weights[1:]):
            figures[f"weight_replay_{k}"] = weight
        if self.replay.weights is not None:
            if task_signal is not None:
                figures["task_signal"] = task_signal
            self.replay.weights.update([task_signal] + [figures[f"replay_loss_{k}"]
                                                        for k in range(len(self.replay.sets))])

    def _replay_micro(self, k: int, step: int, weight: float):
        """``weight · --replay-coef · L_k`` on this step's batch of replayed table ``k`` (a seeded cycle): the mean
        cross-entropy of its completion tokens, or their mean closed-form divergence to the reference."""
        seqs, replay = self.replay.sets[k], self.replay
        rows = batches_for_step(len(seqs), step, LoopOptions(batch_size=replay.batch_size,
                                                             seed=self.opts.loop.seed + k))[0]

        def micro():
            batch = self._batch(seqs, rows)
            target = None
            if replay.divergence is not None:
                target = self.reference.model.target(self.reference.model.hidden(batch))
            value, _ = kd.kd_loss(kd.KDBatch(scored_hidden(self.decoder, batch), batch["token"], target),
                                  self.head.weight, getattr(self.head, "bias", None), replay.divergence)
            loss = weight * replay.coef * value
            return loss, {f"replay_loss_{k}": float(value.detach()), "loss": float(loss.detach())}

        return micro

    def _batch(self, seqs: Sequences, rows: list[int]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in seqs.batch(rows, self.pad_id).items()}

    def _divergence(self, data, rows, batch, hidden, temperature, logprob) -> torch.Tensor:
        """Per-token regularizer estimate (no grad needed): closed form (``full``) or a sample estimator."""
        if self.opts.div_estimator == "full":
            target = self.reference.target(data, rows, batch)
            return engine.token_outputs(hidden, self.head.weight, bias=getattr(self.head, "bias", None),
                                        target=target, divergence=self.regularizer,
                                        temperature=temperature).divergence
        ref = self.reference.token_logprobs(data, rows, batch, temperature)
        return sample_divergence(self.regularizer, logprob, ref, self.opts.div_estimator)

    def _kd_mask(self, data: ScoredRollouts, rows: list[int]) -> torch.Tensor:
        """KDRL's reward-guided mask, per response: 1 where the KD term applies (``--kd-mask``)."""
        correct = torch.from_numpy(data.correct[rows])
        mask = {"all": torch.ones_like(correct), "incorrect": ~correct, "correct": correct}[self.opts.kd_mask]
        return mask.float()

    def _micro(self, data: ScoredRollouts, credit: Credit, rows: list[int], scale: StepScale, temperature: float):
        """One micro-batch's share of the minibatch loss ω Σ_t w_t [g_t L_t + c·d·D_t + β·m·KD_t + a λ_t R_t
        − c_H·H_t], through :func:`fdivctl.engine.token_loss` (gradient taken in the forward pass, no
        ``[tokens, V]`` logits).

        ``d`` is the response's divergence weight (APO's DADS, else 1); ``KD_t`` is KDRL's per-token estimate
        of KL(π_θ‖π_teacher) on the policy's own samples (k2, k3, or the closed form), ``m`` its reward-guided
        mask and ``β`` the (annealed) ``kd_coef``; ``R_t`` is TRACE's routed KL with ``g_t = 1 − a [routed]``
        (else ``g_t = 1``); ω is RECAP's weight of the task."""
        opts = self.opts
        n_tokens, kd_coef, div_coef = scale.n_tokens, scale.kd_coef, scale.div_coef
        regularize = self.regularizer is not None and opts.div_in == "loss" and opts.algo != "dph"
        full = regularize and opts.div_estimator == "full"
        mixture = opts.algo == "rlad"
        distill = opts.kd_on
        kd_full = distill and opts.kd_estimator == "full"
        rkl = divergences.get("rkl")

        def micro():
            batch = self._batch(data.seqs, rows)
            hidden = scored_hidden(self.decoder, batch)
            lengths = data.lengths[rows]
            old = self._old_logprobs(data, rows)
            adv = credit.token_advantages(data, rows).to(self.device)
            div_scale = credit.div_scale[rows].repeat_interleave(lengths).to(self.device)
            weights = grpo.token_weights(lengths, n_tokens, scale.n_seqs, opts.loss_agg).to(self.device)
            target = self.reference.target(data, rows, batch) if full else None
            ref = self.reference.token_logprobs(data, rows, batch, temperature) if regularize and not full else None
            if kd_full:
                target = self.teacher.target(data, rows, batch)
            teacher = self.teacher.token_logprobs(data, rows, batch, temperature) \
                if (distill and not kd_full) or mixture else None
            # the ratio's denominator: π_old, or RLAD's teacher–old mixture
            denominator = rlad.mixture_logprob(teacher, old, opts.mix_lambda) if mixture else old
            kd_mask = self._kd_mask(data, rows).repeat_interleave(lengths).to(self.device) if distill else None
            route = credit.routes(data, rows).to(self.device)
            # TRACE reads its teacher while the KL channel is open and this micro-batch has routed tokens
            routing = opts.algo == "trace" and scale.anneal > 0 and bool((route != trace.GRPO).any())
            if routing:
                target = self._trace_target(data, rows, batch)
            # TRACE: routed tokens hand (1 − a) of their weight to the KL channel; λ_t per route
            pg_share = 1.0 - scale.anneal * (route != trace.GRPO).float()
            kl_coef = scale.anneal * (opts.key_kl_coef * (route == trace.KEY).float()
                                      + opts.error_kl_coef * (route == trace.ERROR).float())
            positive = adv > 0
            parts = {"pg_loss": [], "divergence": [], "clipped": [], "kd": [], "key_kl": [], "error_kl": [],
                     "positive_nll": []}

            def objective(out, r):
                surrogate, clipped = grpo.clipped_surrogate(out["logprob"], denominator[r], adv[r], opts.clip_low,
                                                            opts.clip_high)
                loss = (weights[r] * pg_share[r] * surrogate).sum()
                parts["positive_nll"].append(-(out["logprob"].detach() * positive[r]).sum())
                parts["pg_loss"].append(loss.detach())
                parts["clipped"].append(clipped.sum())
                if regularize:
                    divergence = out["divergence"] if full else \
                        sample_divergence(self.regularizer, out["logprob"], ref[r], opts.div_estimator)
                    parts["divergence"].append(divergence.detach().sum())
                    loss = loss + div_coef * (weights[r] * div_scale[r] * divergence).sum()
                if distill:
                    kd = out["divergence"] if kd_full else \
                        sample_divergence(rkl, out["logprob"], teacher[r], opts.kd_estimator)
                    parts["kd"].append((kd_mask[r] * kd).detach().sum())
                    loss = loss + kd_coef * (weights[r] * kd_mask[r] * kd).sum()
                if routing:
                    routed_kl = out["divergence"]
                    parts["key_kl"].append((routed_kl.detach() * (route[r] == trace.KEY)).sum())
                    parts["error_kl"].append((routed_kl.detach() * (route[r] == trace.ERROR)).sum())
                    loss = loss + (weights[r] * kl_coef[r] * routed_kl).sum()
                if opts.entropy_coef:
                    loss = loss - opts.entropy_coef * (weights[r] * out["entropy"]).sum()
                return loss

            target_divergence = trace.RoutedKL(route) if routing else rkl if kd_full else \
                self.regularizer if full else None
            loss, out = engine.token_loss(hidden, self.head.weight, objective, bias=getattr(self.head, "bias", None),
                                          token_ids=batch["token"], entropy=True, target=target,
                                          divergence=target_divergence, temperature=temperature)
            loss = scale.task_weight * loss
            figures = {"tokens": float(len(adv)), "pg_loss": float(sum(parts["pg_loss"])),
                       "clip_frac": float(sum(parts["clipped"])) / n_tokens,
                       "entropy": float(out.entropy.sum()) / n_tokens,
                       # |log π_θ − log π_old| per token: ~0 on a step's first on-policy pass unless the sampler's
                       # weights or numerics differ from the trainer's
                       "logprob_gap": float((out.logprob - old).abs().sum()) / n_tokens,
                       "loss": float(loss.detach())}
            if regularize:
                figures["divergence"] = float(sum(parts["divergence"])) / n_tokens
            if distill:
                figures["kd"] = float(sum(parts["kd"])) / n_tokens
                figures["kd_tokens"] = float(kd_mask.sum())
            if opts.algo == "trace":
                figures["key_kl"] = float(sum(parts["key_kl"])) / scale.key_tokens
                figures["error_kl"] = float(sum(parts["error_kl"])) / scale.error_tokens
            if self.replay is not None:
                figures["positive_nll"] = float(sum(parts["positive_nll"]))
                figures["positive_tokens"] = float(positive.sum())
            return loss, figures

        return micro

    def _trace_target(self, data: ScoredRollouts, rows: list[int], batch: dict) -> engine.Target:
        """TRACE's teacher on the tokens of ``rows``: a store, a teacher model, or the policy itself (no gradient) —
        the models after each row's privileged prompt when the rollouts have one."""
        if self.teacher is not None and self.teacher.store is not None:
            return self.teacher.target(data, rows, batch)
        teacher_batch = batch if data.privileged is None else self._batch(data.privileged, rows)
        if self.teacher is not None:
            return self.teacher.model.target(self.teacher.model.hidden(teacher_batch))
        with torch.no_grad():
            hidden = scored_hidden(self.decoder, teacher_batch)
        bias = getattr(self.head, "bias", None)
        return engine.TeacherHead(hidden, self.head.weight.detach(), None if bias is None else bias.detach())

    def _pef_micro(self, step: int):
        """η · L_pef on the reference samples of this step (a seeded cycle through them)."""
        samples, opts = self.samples, self.opts
        rows = batches_for_step(len(samples.seqs), step,
                                LoopOptions(batch_size=opts.pef_batch_size, seed=opts.loop.seed))[0]

        def micro():
            batch = self._batch(samples.seqs, rows)
            reference = torch.from_numpy(np.concatenate([samples.logprobs[r] for r in rows])).to(self.device)
            n = len(reference)
            pef, _ = engine.token_loss(
                scored_hidden(self.decoder, batch), self.head.weight,
                lambda out, r: dph.reference_loss(self.regularizer, out["logprob"], reference[r]).sum() / n,
                bias=getattr(self.head, "bias", None), token_ids=batch["token"], temperature=samples.temperature)
            loss = opts.eta * pef
            return loss, {"pef_loss": float(pef.detach()), "loss": float(loss.detach())}

        return micro
