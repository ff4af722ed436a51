"""What the student is pulled toward, chunk by chunk.

Three target kinds, all giving for a chunk of tokens the aligned pair
``(log q, log p)`` over a common support, which the divergence sums over:

* :class:`FullLogits` — a teacher's logits ``[N, V]`` (support = vocabulary);
* :class:`TeacherHead` — a teacher's hidden states ``[N, Hₜ]`` and head
  ``[Vₜ, Hₜ]``: its logits are made per chunk and never exist in full;
* :class:`TeacherMixture` — several teachers' heads, mixed per token with
  fixed weights or MAD-OPD's confidence weights;
* :class:`TopK` — a sparse target from the logit store: ids ``[N, k]``,
  log-probs ``[N, k]`` at the store's temperature, and the log tail mass
  ``log(1 − Σ top-k p)`` ``[N]``.  ``tail="tail"`` (default) compares k+1
  buckets (the k ids plus one bucket holding the rest of each distribution's
  mass), ``"renormalize"`` renormalizes both sides over the k ids, ``"ignore"``
  sums the divergence's summands over the k ids without renormalizing.

Temperature: the student and a full teacher are both divided by ``T``.  A
top-k store made at ``T_store`` is re-tempered as ``p^(T_store/T) / Z``
(DESIGN.md); with a tail bucket this treats the tail as a single outcome, an
approximation that is exact when ``T == T_store``.

Vocabulary: ``vocab="strict"`` refuses a teacher whose vocabulary size differs
from the student's; ``"truncate"`` drops teacher ids ≥ V (a head padded to a
multiple of 64); ``"pad"`` gives the teacher −inf logits on student ids it
lacks.  Never zeros (DESIGN.md).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from fdivctl.divergences.logspace import LOG_FLOOR, floor_log
from fdivctl.engine.finite import has_nan
from fdivctl.engine.matmul import check_softcap, linear_fp32, matmul_weight, soft_cap_

VOCAB_POLICIES = ("strict", "truncate", "pad")
TAIL_MODES = ("tail", "renormalize", "ignore")


class Target(ABC):
    """A per-token target distribution the engine reads chunk by chunk."""

    @property
    @abstractmethod
    def n_tokens(self) -> int:
        """Number of tokens (rows) the target covers."""

    @abstractmethod
    def take(self, index: torch.Tensor) -> Target:
        """The target restricted to rows ``index``."""

    @abstractmethod
    def validate(self, n_tokens: int, vocab_size: int) -> None:
        """Raise ValueError, naming the argument and shapes, unless the target fits."""

    @abstractmethod
    def support(
        self, rows: slice, log_q: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Aligned ``(log q, log p)`` on the common support for ``rows``.

        ``log_q`` is the student's full log-softmax at ``temperature`` for those rows.
        """


def _check_no_nan(name: str, tensor: torch.Tensor) -> None:
    if has_nan(tensor):
        raise ValueError(f"{name} {tuple(tensor.shape)} contains NaN")


class _DenseTarget(Target):
    """Shared vocabulary alignment of the two full-vocabulary targets."""

    vocab: str

    def _check_vocab_policy(self) -> None:
        if self.vocab not in VOCAB_POLICIES:
            raise ValueError(f"vocab={self.vocab!r}; valid: {', '.join(VOCAB_POLICIES)}")

    def _check_vocab(self, name: str, target_vocab: int, vocab_size: int) -> None:
        if target_vocab == vocab_size:
            return
        ok = (self.vocab == "truncate" and target_vocab > vocab_size) or (
            self.vocab == "pad" and target_vocab < vocab_size
        )
        if not ok:
            raise ValueError(
                f"{name} has vocabulary size {target_vocab} but the student head has {vocab_size}; "
                "pass vocab='truncate' (teacher larger, padded head) or vocab='pad' (teacher smaller)"
            )

    def _log_p(self, logits: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
        width = logits.shape[-1]
        if width > vocab_size:
            logits = logits[:, :vocab_size]
        elif width < vocab_size:
            logits = torch.nn.functional.pad(logits, (0, vocab_size - width), value=float("-inf"))
        if temperature != 1.0:
            logits = logits / temperature
        # the target carries no gradient: floor -inf (padding) in place, no copy
        return torch.log_softmax(logits, dim=-1).clamp_min_(LOG_FLOOR)


class FullLogits(_DenseTarget):
    """A teacher's (or reference's) full logits ``[N, V]``."""

    def __init__(self, logits: torch.Tensor, vocab: str = "strict"):
        self.logits = logits
        self.vocab = vocab
        self._check_vocab_policy()

    @property
    def n_tokens(self) -> int:
        return self.logits.shape[0]

    def take(self, index):
        return FullLogits(self.logits[index], self.vocab)

    def validate(self, n_tokens, vocab_size):
        if self.logits.dim() != 2 or self.logits.shape[0] != n_tokens:
            raise ValueError(
                f"target logits have shape {tuple(self.logits.shape)}; expected [{n_tokens}, V]"
            )
        if not self.logits.is_floating_point():
            raise ValueError(f"target logits must be floating point, got {self.logits.dtype}")
        self._check_vocab("target logits", self.logits.shape[1], vocab_size)
        _check_no_nan("target logits", self.logits)

    def dense_logits(self, rows: slice, temperature: float, vocab_size: int) -> torch.Tensor:
        """Logits ``[c, Vₜ]`` for ``rows`` whose ``softmax(· / temperature)`` over the student's ``vocab_size`` ids
        is the target, columns past ``Vₜ`` counting as −inf and those past ``vocab_size`` dropped (the Triton path
        reads them so; unit column stride): the raw logits, whatever the temperature."""
        logits = self.logits[rows].detach()
        return logits if logits.stride(-1) == 1 else logits.contiguous()

    def support(self, rows, log_q, temperature):
        logits = self.dense_logits(rows, temperature, log_q.shape[-1]).to(log_q.dtype)
        return log_q, self._log_p(logits, log_q.shape[-1], temperature)


class TeacherHead(_DenseTarget):
    """A teacher's final hidden states ``[N, Hₜ]`` and lm_head ``[Vₜ, Hₜ]`` (optional bias), its logits
    soft-capped at ``softcap`` for a model that caps them (:func:`~fdivctl.engine.matmul.soft_cap_`)."""

    def __init__(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        vocab: str = "strict",
        softcap: float | None = None,
    ):
        self.hidden = hidden
        self.weight = weight
        self.bias = bias
        self.vocab = vocab
        self.softcap = softcap
        self._check_vocab_policy()
        check_softcap(softcap, "teacher softcap")
        self._weight_mm: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return self.hidden.shape[0]

    def take(self, index):
        taken = TeacherHead(self.hidden[index], self.weight, self.bias, self.vocab, self.softcap)
        taken._weight_mm = self._weight_mm
        return taken

    def validate(self, n_tokens, vocab_size):
        h, w = self.hidden, self.weight
        if h.dim() != 2 or h.shape[0] != n_tokens:
            raise ValueError(f"teacher hidden has shape {tuple(h.shape)}; expected [{n_tokens}, H_t]")
        if w.dim() != 2 or w.shape[1] != h.shape[1]:
            raise ValueError(
                f"teacher weight {tuple(w.shape)} does not match teacher hidden {tuple(h.shape)}: "
                "expected [V_t, H_t]"
            )
        if h.dtype != w.dtype:
            raise ValueError(f"teacher hidden dtype {h.dtype} differs from teacher weight dtype {w.dtype}")
        if self.bias is not None and tuple(self.bias.shape) != (w.shape[0],):
            raise ValueError(f"teacher bias {tuple(self.bias.shape)}; expected [{w.shape[0]}]")
        self._check_vocab("teacher head", w.shape[0], vocab_size)
        _check_no_nan("teacher hidden", h)
        _check_no_nan("teacher weight", w)

    def dense_logits(self, rows: slice, temperature: float, vocab_size: int) -> torch.Tensor:
        """The teacher's logits ``[c, Vₜ]`` for ``rows`` (fp32, or fp64 for fp64 inputs), made now; the raw
        logits whatever the temperature, as :meth:`FullLogits.dense_logits`."""
        if self._weight_mm is None:
            self._weight_mm = matmul_weight(self.weight.detach())
        bias = None if self.bias is None else self.bias.detach()
        logits = linear_fp32(self.hidden[rows].detach(), self._weight_mm, bias)
        soft_cap_(logits, self.softcap)
        return logits

    def support(self, rows, log_q, temperature):
        logits = self.dense_logits(rows, temperature, log_q.shape[-1]).to(log_q.dtype)
        return log_q, self._log_p(logits, log_q.shape[-1], temperature)


def normalize_weights(weights: list[float], n: int) -> list[float]:
    """Mixture weights ``w_i / Σ w`` of ``n`` components; ValueError unless ``n`` finite non-negative numbers with
    a positive sum (an infinite weight would make the normalized mixture NaN)."""
    if len(weights) != n or not all(math.isfinite(w) and w >= 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"weights {list(weights)} must be {n} finite non-negative numbers with a positive sum")
    total = sum(weights)
    return [w / total for w in weights]


class TeacherMixture(Target):
    """A per-token mixture of teachers: ``p_t = Σ_i w_{t,i} p_{t,i}``, in log space.

    ``weights`` is a list (fixed ``w_i``, normalized to sum to 1) or
    ``"confidence"``: ``w_{t,i} ∝ max_v p_{t,i}(v)``, each teacher weighted by
    its own top-token probability at that position (MAD-OPD's
    confidence-weighted mixture; seed: "MAD-OPD: Breaking the Ceiling in
    On-Policy Distillation via Multi-Agent Debate").
    """

    def __init__(self, teachers: list[TeacherHead], weights: list[float] | str = "confidence"):
        if not teachers:
            raise ValueError("TeacherMixture needs at least one teacher")
        if isinstance(weights, str):
            if weights != "confidence":
                raise ValueError(f"weights={weights!r}; valid: a list of numbers or 'confidence'")
        else:
            weights = normalize_weights(weights, len(teachers))
        self.teachers = teachers
        self.weights = weights

    @property
    def n_tokens(self) -> int:
        return self.teachers[0].n_tokens

    def take(self, index):
        return TeacherMixture([t.take(index) for t in self.teachers], self.weights)

    def validate(self, n_tokens, vocab_size):
        for teacher in self.teachers:
            teacher.validate(n_tokens, vocab_size)

    def log_p(self, rows: slice, vocab_size: int, temperature: float, dtype: torch.dtype) -> torch.Tensor:
        """The mixture's log-probabilities ``[c, V]`` for ``rows`` at ``temperature``, floored."""
        log_ps = torch.stack([
            t._log_p(t.dense_logits(rows, temperature, vocab_size).to(dtype), vocab_size, temperature)
            for t in self.teachers
        ])  # [T, c, V]
        if self.weights == "confidence":
            log_w = log_ps.amax(dim=-1, keepdim=True)
            log_w = log_w - torch.logsumexp(log_w, dim=0, keepdim=True)
        else:
            w = torch.tensor(self.weights, dtype=log_ps.dtype, device=log_ps.device)
            log_w = w.clamp_min(1e-300).log().view(-1, 1, 1)
        return torch.logsumexp(log_ps + log_w, dim=0).clamp_min_(LOG_FLOOR)

    def dense_logits(self, rows: slice, temperature: float, vocab_size: int) -> torch.Tensor:
        """``T · log p`` ``[c, V]`` (fp32): logits whose ``softmax(· / T)`` is the mixture at ``T``, for the Triton
        path, which divides a target's logits by the temperature."""
        return self.log_p(rows, vocab_size, temperature, torch.float32).mul_(temperature)

    def support(self, rows, log_q, temperature):
        return log_q, self.log_p(rows, log_q.shape[-1], temperature, log_q.dtype)


class TopK(Target):
    """Sparse top-k target with an explicit tail (the logit store's format)."""

    def __init__(
        self,
        ids: torch.Tensor,
        logprobs: torch.Tensor,
        log_tail: torch.Tensor,
        temperature: float = 1.0,
        tail: str = "tail",
    ):
        if tail not in TAIL_MODES:
            raise ValueError(f"tail={tail!r}; valid: {', '.join(TAIL_MODES)}")
        if not temperature > 0:
            raise ValueError(f"store temperature must be > 0, got {temperature}")
        self.ids = ids
        self.logprobs = logprobs
        self.log_tail = log_tail
        self.temperature = float(temperature)
        self.tail = tail

    @property
    def n_tokens(self) -> int:
        return self.ids.shape[0]

    def take(self, index):
        return TopK(
            self.ids[index], self.logprobs[index], self.log_tail[index], self.temperature, self.tail
        )

    def validate(self, n_tokens, vocab_size):
        ids, lp, tail = self.ids, self.logprobs, self.log_tail
        if ids.dim() != 2 or ids.shape[0] != n_tokens:
            raise ValueError(f"top-k ids have shape {tuple(ids.shape)}; expected [{n_tokens}, k]")
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"top-k ids must be int32 or int64, got {ids.dtype}")
        if ids.shape[1] > vocab_size:
            raise ValueError(f"top-k k={ids.shape[1]} exceeds the student vocabulary size {vocab_size}")
        if lp.shape != ids.shape:
            raise ValueError(f"top-k logprobs {tuple(lp.shape)} must match top-k ids {tuple(ids.shape)}")
        if tuple(tail.shape) != (n_tokens,):
            raise ValueError(f"top-k log_tail has shape {tuple(tail.shape)}; expected [{n_tokens}]")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"top-k ids out of range [0, {vocab_size}): min {int(ids.min())}, max {int(ids.max())}")
        if ids.shape[1] > 1:
            ordered = ids.sort(dim=-1).values
            repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=-1)
            if bool(repeated.any()):
                row = int(repeated.nonzero()[0, 0])
                raise ValueError(f"top-k ids repeat an id within a row (row {row}): each row's k ids must be distinct")
        _check_no_nan("top-k logprobs", lp)
        _check_no_nan("top-k log_tail", tail)

    def target_buckets(self, rows: slice, dtype: torch.dtype, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's side for ``rows``: ``(log p [c, k], log p_tail [c, 1])`` at ``temperature``, floored
        (re-tempered as ``p^(T_store/T) / Z`` over the k+1 buckets when ``T`` differs from the store's)."""
        log_p = floor_log(self.logprobs[rows].to(dtype))
        log_p_tail = floor_log(self.log_tail[rows].to(dtype)).unsqueeze(-1)
        if temperature != self.temperature:
            scale = self.temperature / temperature
            buckets = torch.cat((log_p, log_p_tail), dim=-1) * scale
            buckets = buckets - torch.logsumexp(buckets, dim=-1, keepdim=True)
            log_p, log_p_tail = buckets[:, :-1], buckets[:, -1:]
        return log_p, log_p_tail

    def aligned(
        self, log_q_top: torch.Tensor, log_q_tail: torch.Tensor | None, log_p: torch.Tensor, log_p_tail: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log q, log p)`` on the support ``tail`` asks for, from the student's log-probs of the k ids
        ``[c, k]`` and of the rest ``[c, 1]`` (needed for ``"tail"`` only) and :meth:`target_buckets`."""
        if self.tail == "tail":
            return torch.cat((log_q_top, log_q_tail), -1), torch.cat((log_p, log_p_tail), -1)
        if self.tail == "renormalize":
            return (
                log_q_top - torch.logsumexp(log_q_top, -1, keepdim=True),
                log_p - torch.logsumexp(log_p, -1, keepdim=True),
            )
        return log_q_top, log_p

    def support(self, rows, log_q, temperature):
        ids = self.ids[rows].long()
        log_q_tail = None
        if self.tail == "tail":
            log_q_tail = torch.logsumexp(log_q.scatter(-1, ids, LOG_FLOOR), dim=-1, keepdim=True)
        return self.aligned(log_q.gather(-1, ids), log_q_tail, *self.target_buckets(rows, log_q.dtype, temperature))
