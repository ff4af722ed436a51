"""The options of ``train``'s GRPO family (and every method built on it), their presets and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fdivctl import divergences
from fdivctl.divergences import Divergence
from fdivctl.errors import UserError
from fdivctl.objectives import fdpg, grpo
from fdivctl.schedules.kl_control import KLCoefficient
from fdivctl.training.loop import LoopOptions

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
    tis_cap: float | None = None  # truncated importance sampling against the sampler's log-probs; None: off
    ppo_epochs: int = 1
    minibatch_size: int | None = None  # responses per optimizer step; None: all of them
    micro_batch_size: int = 8
    chunk_size: int | None = None  # token rows per chunk of the head's [rows, V] pass; None: the engine's default
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
    allow_prompt_mismatch: bool = False  # a --ref-logits/--teacher-logits store made from other prompts
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
        if self.ppo_epochs < 1 or self.micro_batch_size < 1 or \
                (self.minibatch_size is not None and self.minibatch_size < 1):
            raise UserError("--ppo-epochs, --micro-batch-size and --minibatch-size must be ≥ 1")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise UserError(f"--chunk-size must be ≥ 1, got {self.chunk_size}")
        if self.tis_cap is not None and not self.tis_cap >= 1:
            raise UserError(f"--tis-cap must be ≥ 1 (the largest importance weight; 2 in the TIS paper), got "
                            f"{self.tis_cap}")
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
        return _divergence_or_none(self.replay_objective, "sft", "--replay-objective: sft or a divergence; ")

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
        return _divergence_or_none(self.divergence, "none", "--divergence: ")

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


def _divergence_or_none(value: str, off: str, error_prefix: str) -> Divergence | None:
    """``value`` parsed as a registry divergence, or None when it is ``off``; UserError (``error_prefix`` + why)."""
    if value == off:
        return None
    try:
        return divergences.parse(value)
    except ValueError as err:
        raise UserError(f"{error_prefix}{err}") from None
