"""The regularizer's coefficient set per update: constant, FG-ExPO's AKL, or SAFE's entropy-gated PID control.

``--div-coef-schedule constant``: ``c = --div-coef``.

``akl`` — Accuracy-Conditioned KL scaling (seed: "fg-expo: Frontier-guided
exploration-prioritized policy optimization via adaptive kl and gaussian
curriculum", arXiv 2605.11403; METHODS.md §2.1): a smooth, increasing function
of the batch's mean accuracy ``ā`` — looser KL when the model struggles,
tighter when it succeeds.  We use a logistic

    c(ā) = c_max · σ(κ (ā − a₀)),      c_max = --div-coef, a₀ = --akl-center (0.5), κ = --akl-sharpness (10).

The paper's exact curve is not restated in METHODS.md and we could not read
it here: the logistic shape and its defaults are ours.

``pid`` — SAFE's entropy-aware predictive KL control (seed: "SAFE: Stable
Alignment Finetuning with Entropy-Aware Predictive Control", arXiv
2602.04651; gains and constants from the authors' public code, ryyzn9/SAFE):

* reward velocity ``v = EMA_0.95(r̄)_s − EMA_0.95(r̄)_{s−1}``; error
  ``e = v − 0.001``; ``PID = K_p e + K_i Σe + K_d Δe`` with ``Σe`` clamped to
  ±1 (anti-windup), ``K_p, K_i, K_d = 0.3, 0.01, 0.05``;
* threshold ``τ = clamp(τ_base + PID, 0.1, 0.6)``, ``τ_base = --kl-threshold`` (0.3);
* the KL is tracked by ``K̄ = EMA_0.9`` of the measured per-token divergence;
* entropy gate ``φ = max(0.5, H* / (H̄ + 0.1))``, ``H* = --target-entropy``
  (2.0 nats), ``H̄`` the batch's mean token entropy: a collapsing
  (low-entropy) policy is held harder, an exploring one is spared;
* SAFE's penalty is ``0.1 φ (K̄ − τ)₊²``.  The public code adds it as a
  number without a gradient; we give it one: the coefficient of the per-token
  divergence is that penalty's derivative in ``K``,
  ``c = 2 · --div-coef · φ · (K̄ − τ)₊`` (``--div-coef`` in the role of 0.1).

The PID and trackers update after every optimizer step from that step's
measured divergence, entropy and the batch's mean reward, so step ``s`` uses
the state after step ``s − 1`` (zero KL before the first step: no penalty).
SAFE's phase detector (threshold multipliers by training phase) and its
double soft-min critic are not included.  The controller's state is saved
with each checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from fdivctl.errors import UserError

SCHEDULES = ("constant", "akl", "pid")


@dataclass
class PIDState:
    kl_short: float = 0.0
    reward_ema: float | None = None
    integral: float = 0.0
    previous_error: float = 0.0
    threshold: float | None = None
    entropy: float | None = None  # the last update's mean token entropy


@dataclass
class KLCoefficient:
    """The coefficient of the divergence regularizer at each update."""

    schedule: str = "constant"
    base: float = 0.04  # --div-coef
    akl_center: float = 0.5
    akl_sharpness: float = 10.0
    kl_threshold: float = 0.3
    target_entropy: float = 2.0
    gains: tuple[float, float, float] = (0.3, 0.01, 0.05)
    state: PIDState = field(default_factory=PIDState)

    def check(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UserError(f"--div-coef-schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.base < 0 or self.akl_sharpness <= 0 or self.target_entropy <= 0 or self.kl_threshold < 0:
            raise UserError("--div-coef, --kl-threshold must be ≥ 0 and --akl-sharpness, --target-entropy > 0")

    def value(self, accuracy: float) -> float:
        """The coefficient for the next update, from the batch's mean ``accuracy`` (akl) or the controller's
        state (pid)."""
        if self.schedule == "akl":
            return self.base / (1.0 + math.exp(-self.akl_sharpness * (accuracy - self.akl_center)))
        if self.schedule == "pid":
            threshold = self._threshold()
            entropy = self.state.entropy
            gate = 1.0 if entropy is None else max(0.5, self.target_entropy / (entropy + 0.1))
            return 2.0 * self.base * gate * max(0.0, self.state.kl_short - threshold)
        return self.base

    def _threshold(self) -> float:
        return self.kl_threshold if self.state.threshold is None else self.state.threshold

    def update(self, divergence: float, entropy: float, reward: float) -> None:
        """After an update: track its measured mean divergence and token entropy and the batch's mean reward
        (pid only)."""
        if self.schedule != "pid":
            return
        s = self.state
        s.entropy = entropy
        s.kl_short = 0.9 * s.kl_short + 0.1 * divergence
        pid = 0.0
        if s.reward_ema is None:
            s.reward_ema = reward
        else:
            previous = s.reward_ema
            s.reward_ema = 0.95 * s.reward_ema + 0.05 * reward
            error = (s.reward_ema - previous) - 0.001
            s.integral = max(-1.0, min(1.0, s.integral + error))
            kp, ki, kd = self.gains
            pid = kp * error + ki * s.integral + kd * (error - s.previous_error)
            s.previous_error = error
        s.threshold = max(0.1, min(0.6, self.kl_threshold + pid))

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = PIDState(**state)
