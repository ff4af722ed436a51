"""One pass over the tokens in chunks: the only place student logits exist.

For each chunk of rows the student logits ``z = h Wᵀ (+ b)`` ``[c, V]`` are
made in fp32 (soft-capped, ``c·tanh(z/c)``, for a model that caps its logits),
the requested per-token quantities are computed from ``log q = log_softmax(z / T)``:

* ``logprob``    — ``log q(y_t)`` of given token ids;
* ``entropy``    — ``H(q) = −Σ q log q``;
* ``divergence`` — ``D(q‖p)`` against the target, summed over its support
  (or a :class:`~fdivctl.engine.chunk_loss.ChunkLoss`'s per-token value);

and, when an objective is given — a sum over the chunk's tokens of any
function of their outputs, e.g. ``Σ_t Σ_k c_k[t] · out_k[t]`` for fixed
cotangents (:class:`LinearObjective`) — its gradient ``∂/∂z`` is taken by
autograd on that chunk alone and pushed through the head into ``grad h``,
``grad W`` (fp32 accumulator) and ``grad b``; the objective's value is summed.  The chunk's ``[c, V]`` buffers are freed before the next
chunk, so peak memory is O(c·V + G·V + V·H) instead of O(N·V), with ``G`` the
rows of logit gradients held for one weight-gradient GEMM
(:class:`PendingWeightGrad`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fdivctl.divergences import Divergence
from fdivctl.divergences.logspace import LOG_FLOOR, compute_dtype
from fdivctl.engine.chunk_loss import ChunkLoss
from fdivctl.engine.matmul import accumulate_weight_grad, input_grad, linear_fp32, soft_cap_
from fdivctl.engine.targets import Target, TopK

OUTPUT_NAMES = ("logprob", "entropy", "divergence")
#: row of ``triton_chunk.STAT_ROWS`` holding the first of OUTPUT_NAMES
STAT_OFFSET = 2
KERNELS = ("auto", "torch", "triton")
#: the head's gradient accumulator across chunks: fp32 (default), or the dtype the matmuls read
#: the weight in ("param": bf16 for a bf16 head on CUDA, Liger-Kernel's default; half the memory,
#: one rounding per chunk)
WEIGHT_GRAD_ACCUM = ("fp32", "param")

#: ``objective(outputs of a chunk's tokens, their rows) → scalar``; must be a sum over those tokens
Objective = Callable[[dict[str, torch.Tensor], slice], torch.Tensor]


class LinearObjective:
    """``Σ_t Σ_k c_k[t] · out_k[t]``: the vector–Jacobian product of fixed per-token cotangents ``c_k`` ``[N]``
    (keys of :data:`OUTPUT_NAMES`).  Its derivatives are the cotangents themselves, so the Triton path takes
    them as they are (:meth:`chunk_cotangents`) instead of by autograd."""

    def __init__(self, cotangents: dict[str, torch.Tensor]):
        self.cotangents = cotangents

    def __call__(self, chunk: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
        return sum((chunk[k] * c[rows]).sum() for k, c in self.cotangents.items())

    def chunk_cotangents(self, rows: slice, like: torch.Tensor) -> torch.Tensor:
        """``[3, c]`` fp32, the cotangents of :data:`OUTPUT_NAMES` on ``rows`` (zeros where none), on ``like``'s
        device: the gradient kernel's ``cotangents``."""
        zero = torch.zeros_like(like)
        return torch.stack([self.cotangents[name][rows].to(like.dtype) if name in self.cotangents else zero
                            for name in OUTPUT_NAMES])


@dataclass
class SweepPlan:
    """What to compute per token; everything but the head's tensors."""

    token_ids: torch.Tensor | None
    entropy: bool
    target: Target | None
    divergence: Divergence | ChunkLoss | None
    temperature: float
    chunk_size: int
    kernel: str = "torch"  # "torch" (reference, any device) or "triton" (resolve_kernel)
    weight_grad_accum: str = "fp32"  # one of WEIGHT_GRAD_ACCUM
    # logit-gradient rows per weight-gradient GEMM (PendingWeightGrad); ≤ chunk_size: each chunk's own
    weight_grad_rows: int = 0
    softcap: float | None = None  # the student's final-logit soft cap c (matmul.soft_cap_)

    @property
    def outputs(self) -> tuple[str, ...]:
        wanted = {
            "logprob": self.token_ids is not None,
            "entropy": self.entropy,
            "divergence": self.divergence is not None,
        }
        return tuple(name for name in OUTPUT_NAMES if wanted[name])


@dataclass
class SweepGrads:
    hidden: torch.Tensor | None
    weight: torch.Tensor | None  # accumulator: fp32, or the matmul dtype (WEIGHT_GRAD_ACCUM)
    bias: torch.Tensor | None  # fp32 accumulator


def triton_runs_here(device: torch.device) -> bool:
    """Whether the Triton kernels can run for tensors on ``device``: CUDA with triton installed,
    or any device under Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return importlib.util.find_spec("triton") is not None


def _triton_unsupported(hidden: torch.Tensor, target: Target | None, divergence) -> str | None:
    if isinstance(divergence, ChunkLoss):
        return f"the {divergence.name} loss runs on the PyTorch path"
    if hidden.dtype == torch.float64:
        return "fp64 inputs run on the PyTorch path"
    if target is not None and not (hasattr(target, "dense_logits") or isinstance(target, TopK)):
        return f"{type(target).__name__} targets run on the PyTorch path (Triton: dense targets and top-k)"
    if not triton_runs_here(hidden.device):
        return "it needs a CUDA device and triton (or TRITON_INTERPRET=1)"
    return None


def resolve_kernel(kernel: str, hidden: torch.Tensor, target: Target | None, divergence=None) -> str:
    """``"torch"`` or ``"triton"`` for a requested ``kernel`` of :data:`KERNELS`.

    ``"auto"`` takes Triton on CUDA wherever it applies (no fp64, a target with ``dense_logits``, a top-k or
    none, no :class:`ChunkLoss`), else the PyTorch path; ``"triton"`` raises ValueError where it cannot run.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}; valid: {', '.join(KERNELS)}")
    if kernel == "torch":
        return "torch"
    reason = _triton_unsupported(hidden, target, divergence)
    if kernel == "triton" and reason:
        raise ValueError(f"kernel='triton' cannot run here: {reason}")
    return "triton" if reason is None and (kernel == "triton" or hidden.device.type == "cuda") else "torch"


def chunk_outputs(plan: SweepPlan, logits: torch.Tensor, rows: slice) -> dict[str, torch.Tensor]:
    """The requested per-token quantities for one chunk of student logits (fp32, ``[c, V]``).

    The student's logits are finite (the head's inputs are checked), so its
    log-probs are finite too and need no floor.
    """
    if plan.temperature != 1.0:
        logits = logits / plan.temperature
    log_q = torch.log_softmax(logits, dim=-1)
    out: dict[str, torch.Tensor] = {}
    if plan.token_ids is not None:
        out["logprob"] = log_q.gather(-1, plan.token_ids[rows].long().unsqueeze(-1)).squeeze(-1)
    if plan.entropy:
        out["entropy"] = -(log_q.exp() * log_q).sum(-1)
    if isinstance(plan.divergence, ChunkLoss):
        out["divergence"] = plan.divergence.chunk_values(log_q, plan.target, rows, plan.temperature)
    elif plan.divergence is not None:
        log_q_s, log_p_s = plan.target.support(rows, log_q, plan.temperature)
        out["divergence"] = plan.divergence.support_divergence(log_q_s, log_p_s)
    return out


def _torch_chunk(
    plan: SweepPlan, logits: torch.Tensor, rows: slice, objective: Objective | None, with_grad: bool
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """The reference path: outputs by PyTorch ops, ``∂/∂z`` by autograd on the chunk."""
    if not with_grad:
        with torch.no_grad():
            chunk = chunk_outputs(plan, logits, rows)
            return chunk, None if objective is None else objective(chunk, rows), None
    logits.requires_grad_(True)
    with torch.enable_grad():
        chunk = chunk_outputs(plan, logits, rows)
        value = objective(chunk, rows)
        (grad_logits,) = torch.autograd.grad(value, logits)
    return {name: v.detach() for name, v in chunk.items()}, value.detach(), grad_logits


def _triton_chunk(
    plan: SweepPlan,
    logits: torch.Tensor,
    rows: slice,
    objective: Objective | None,
    with_grad: bool,
    grad_dtype: torch.dtype,
    out: torch.Tensor | None,
    stats: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """The fused path (:mod:`fdivctl.engine.triton_chunk`): outputs from one row kernel, written into
    ``stats`` (the chunk's columns of the sweep's ``[6, N]`` buffer, whose rows are the per-token outputs); the
    objective's cotangents by autograd on those ``[c]`` outputs alone (as they are for a :class:`LinearObjective`);
    ``∂/∂z`` from a second
    row kernel, written in ``grad_dtype`` into ``out`` when given (else in place over the logits when
    that is fp32)."""
    from fdivctl.engine import triton_chunk

    ids = None if plan.token_ids is None else plan.token_ids[rows].contiguous()
    target = None if plan.target is None else plan.target.dense_logits(rows, plan.temperature, logits.shape[1])
    args = (logits, target, logits.shape[1], ids, plan.entropy, plan.divergence, plan.temperature)
    triton_chunk.chunk_stats(*args, out=stats)
    chunk = {name: stats[STAT_OFFSET + OUTPUT_NAMES.index(name)] for name in plan.outputs}
    if not with_grad:
        return chunk, None if objective is None else objective(chunk, rows), None
    if isinstance(objective, LinearObjective):
        value, cotangents = objective(chunk, rows), objective.chunk_cotangents(rows, stats[0])
    else:
        leaves = {name: value.detach().requires_grad_(True) for name, value in chunk.items()}
        with torch.enable_grad():
            value = objective(leaves, rows)
        grads = _leaf_grads(value, leaves)
        zero = torch.zeros_like(stats[0])
        cotangents = torch.stack([grads.get(name, zero) for name in OUTPUT_NAMES])
    out = _gradient_buffer(logits, grad_dtype, out)
    return chunk, value.detach(), triton_chunk.chunk_grad(*args, stats, cotangents, out)


def _leaf_grads(value: torch.Tensor, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``∂value/∂leaf`` for each of ``leaves``, by autograd; zeros for a leaf ``value`` does not depend on."""
    grads = [None] * len(leaves)
    if value.requires_grad:
        grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    return {name: torch.zeros_like(leaf) if grad is None else grad for (name, leaf), grad in zip(leaves.items(), grads)}


def _gradient_buffer(logits: torch.Tensor, grad_dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    """Where a chunk's ``∂/∂z`` goes: ``out`` when given, else over the logits when they are in ``grad_dtype``."""
    if out is not None:
        return out
    return logits if grad_dtype == logits.dtype else torch.empty_like(logits, dtype=grad_dtype)


def _topk_outputs(plan: SweepPlan, rows: slice, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The per-token outputs of a chunk against a :class:`~fdivctl.engine.targets.TopK` target, from the
    leaves of :func:`_triton_topk_chunk`: the k ids' logits ``x_top = z_top/T`` ``[c, k]``, the rest's
    log-partition ``L = log Σ_rest e^{z/T}`` and entropy ``H'`` ``[c]``, and the given token's ``x_y`` ``[c]``.

    ``log Z = logaddexp(L, logsumexp x_top)``, ``log q_top = x_top − log Z``, the rest's mass
    ``log Q = L − log Z`` (floored: −inf when the k ids are the whole vocabulary, as the PyTorch path's tail);
    ``H = −Σ_top q log q + Q (H' − log Q)`` (since ``q_j = Q q'_j`` on the rest); the divergence on the
    support the target's ``tail`` mode asks for (:meth:`~fdivctl.engine.targets.TopK.aligned`)."""
    top, lse_rest = leaves["top"], leaves["lse_rest"]
    lse = torch.logaddexp(lse_rest, torch.logsumexp(top, dim=-1))
    log_q_top = top - lse.unsqueeze(-1)
    log_q_rest = (lse_rest - lse).clamp_min(LOG_FLOOR)
    out: dict[str, torch.Tensor] = {}
    if plan.token_ids is not None:
        out["logprob"] = leaves["y"] - lse
    if plan.entropy:
        rest = torch.where(torch.isneginf(lse_rest), 0.0, log_q_rest.exp() * (leaves["h_rest"] - log_q_rest))
        out["entropy"] = rest - (log_q_top.exp() * log_q_top).sum(-1)
    if plan.divergence is not None:
        target_side = plan.target.target_buckets(rows, top.dtype, plan.temperature)
        support = plan.target.aligned(log_q_top, log_q_rest.unsqueeze(-1), *target_side)
        out["divergence"] = plan.divergence.support_divergence(*support)
    return out


def _triton_topk_chunk(
    plan: SweepPlan,
    logits: torch.Tensor,
    rows: slice,
    objective: Objective | None,
    with_grad: bool,
    grad_dtype: torch.dtype,
    out: torch.Tensor | None,
    stats: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """The fused path for a top-k target: the k ids' logits (and the given token's) are gathered, set to −inf
    in ``logits``, and one row kernel without a divergence sums the rest (``L``, ``H'``:
    :func:`~fdivctl.engine.triton_chunk.chunk_stats`); the outputs follow on ``[c, k]`` tensors
    (:func:`_topk_outputs`), the objective's derivatives with respect to those leaves by autograd; the
    gradient over the rest from the gradient kernel (:func:`~fdivctl.engine.triton_chunk.chunk_grad`, ``rest``),
    the k ids' ``(1/T) ∂L/∂x_top`` written over it.  Two reads of the ``[c, V]`` logits, as for a dense
    target, where the PyTorch path makes several ``[c, V]`` temporaries (log-softmax, scatter, their
    gradients).  Overwrites ``logits``; the outputs go into ``stats`` as :func:`_triton_chunk`'s do."""
    from fdivctl.engine import triton_chunk

    inv_t = 1.0 / plan.temperature
    ids = plan.target.ids[rows].long()
    token_ids = None if plan.token_ids is None else plan.token_ids[rows].contiguous()
    leaves = {"top": logits.gather(1, ids) * inv_t}
    if token_ids is not None:
        leaves["y"] = logits.gather(1, token_ids.long().unsqueeze(1)).squeeze(1) * inv_t
    logits.scatter_(1, ids, float("-inf"))
    rest = torch.empty(len(triton_chunk.STAT_ROWS), logits.shape[0], dtype=torch.float32, device=logits.device)
    triton_chunk.chunk_stats(logits, None, logits.shape[1], None, plan.entropy, None, plan.temperature, out=rest)
    leaves["lse_rest"] = rest[0]
    if plan.entropy:  # H' is 0/0 where nothing is outside the top k; it is multiplied by that rest's mass, 0
        rest[3] = torch.where(torch.isneginf(rest[0]), 0.0, rest[3])
        leaves["h_rest"] = rest[3]
    leaves = {name: leaf.detach().requires_grad_(with_grad) for name, leaf in leaves.items()}
    with torch.set_grad_enabled(with_grad):
        outputs = _topk_outputs(plan, rows, leaves)
        value = None if objective is None else objective(outputs, rows)
    chunk = {}
    for name, output in outputs.items():
        chunk[name] = stats[STAT_OFFSET + OUTPUT_NAMES.index(name)]
        chunk[name].copy_(output.detach())
    if not with_grad:
        return chunk, value, None
    grads = _leaf_grads(value, leaves)
    zero = torch.zeros_like(rest[0])
    # chunk_grad's rows with rest=True: ∂L/∂x_y, ∂L/∂H', none for a divergence, ∂L/∂L
    cotangents = torch.stack([grads.get(name, zero) for name in ("y", "h_rest", None, "lse_rest")])
    out = _gradient_buffer(logits, grad_dtype, out)
    triton_chunk.chunk_grad(logits, None, logits.shape[1], token_ids, plan.entropy, None, plan.temperature, rest,
                            cotangents, out, rest=True)
    top_grad = grads["top"]
    if token_ids is not None:  # a given token among the k ids: its δ term lands on the entry written here
        top_grad = top_grad + (ids == token_ids.long().unsqueeze(1)) * cotangents[0].unsqueeze(1)
    out.scatter_(1, ids, (top_grad * inv_t).to(out.dtype))
    return chunk, value.detach(), out


class PendingWeightGrad:
    """Logit gradients of consecutive chunks, held until ``G`` rows are there, then added into the head's
    gradient accumulator by one GEMM ``grad W += gᵀ h`` with inner dimension ``G``.

    Each such GEMM reads and writes the whole ``[V, H]`` accumulator (fp32: 8·V·H bytes) for 2·G·V·H FLOPs,
    i.e. G/4 FLOP per byte: with G = one chunk of a few hundred rows it is bound by memory on a GPU (an H100
    does ~300 bf16 FLOP per byte of HBM): on an H200, jsd at N = 8192, H = 4096, V = 151936 took 119 / 89 ms
    with one GEMM per chunk of 256 / 512 rows and 81 / 77 ms with G ≈ H (``bench/loss_engine.py``).  The
    rows wait in one ``[G, V]`` buffer in the matmul dtype (the chunk kernels write their gradient straight
    into it).  ``G`` ≤ one chunk holds nothing: each chunk's gradient goes in at once, as before.
    """

    def __init__(self, acc: torch.Tensor, hidden: torch.Tensor, dtype: torch.dtype, plan: SweepPlan):
        self.acc, self.hidden = acc, hidden
        rows = min(plan.weight_grad_rows, hidden.shape[0])
        self.buffer = (
            torch.empty(rows, acc.shape[0], dtype=dtype, device=hidden.device) if rows > plan.chunk_size else None
        )
        self.start = self.filled = 0

    def slot(self, rows: slice) -> torch.Tensor | None:
        """Where the chunk ``rows``' gradient goes (``[c, V]``), or None when it is added at once."""
        if self.buffer is None:
            return None
        count = rows.stop - rows.start
        if self.filled + count > self.buffer.shape[0]:
            self.flush()
        if self.filled == 0:
            self.start = rows.start
        return self.buffer[self.filled : self.filled + count]

    def add(self, grad_logits: torch.Tensor, rows: slice) -> None:
        """Count the chunk's gradient in (it lies in its :meth:`slot`, or is added now when there is none)."""
        if self.buffer is None:
            accumulate_weight_grad(self.acc, grad_logits, self.hidden[rows])
        else:
            self.filled += rows.stop - rows.start

    def flush(self) -> None:
        if self.filled:
            rows = slice(self.start, self.start + self.filled)
            accumulate_weight_grad(self.acc, self.buffer[: self.filled], self.hidden[rows])
        self.filled = 0


def sweep(
    hidden: torch.Tensor,
    weight_mm: torch.Tensor,
    bias: torch.Tensor | None,
    plan: SweepPlan,
    objective: Objective | None = None,
    needs: tuple[bool, bool, bool] = (False, False, False),
) -> tuple[dict[str, torch.Tensor], SweepGrads, torch.Tensor | None]:
    """Run the chunks; return per-token outputs ``[N]``, the gradients of ``objective`` (where
    ``needs`` asks for them: hidden, weight, bias) and its summed value (None without one)."""
    n = hidden.shape[0]
    acc = compute_dtype(hidden, weight_mm)
    if plan.kernel == "triton":
        from fdivctl.engine.triton_chunk import STAT_ROWS

        # the row kernel writes every chunk's statistics here; the per-token outputs are rows of it (no copies)
        stats = torch.empty(len(STAT_ROWS), n, dtype=torch.float32, device=hidden.device)
        outputs = {name: stats[STAT_OFFSET + OUTPUT_NAMES.index(name)] for name in plan.outputs}
    else:
        stats = None
        outputs = {name: torch.empty(n, dtype=acc, device=hidden.device) for name in plan.outputs}
    with_grad = objective is not None and any(needs)
    grads = SweepGrads(
        hidden=torch.empty_like(hidden) if with_grad and needs[0] else None,
        weight=torch.zeros(
            weight_mm.shape, dtype=acc if plan.weight_grad_accum == "fp32" else weight_mm.dtype, device=hidden.device
        )
        if with_grad and needs[1]
        else None,
        bias=torch.zeros(weight_mm.shape[0], dtype=acc, device=hidden.device)
        if with_grad and needs[2]
        else None,
    )
    values: list[torch.Tensor] = []  # the objective's value per chunk, summed once at the end
    pending = None if grads.weight is None else PendingWeightGrad(grads.weight, hidden, weight_mm.dtype, plan)
    for start in range(0, n, plan.chunk_size):
        rows = slice(start, min(start + plan.chunk_size, n))
        h_chunk = hidden[rows]
        logits = linear_fp32(h_chunk, weight_mm, bias)
        cap_slope = soft_cap_(logits, plan.softcap, slope=with_grad)
        slot = None if pending is None else pending.slot(rows)
        if plan.kernel == "triton":
            fused = _triton_topk_chunk if isinstance(plan.target, TopK) else _triton_chunk
            chunk, value, grad_logits = fused(plan, logits, rows, objective, with_grad, weight_mm.dtype, slot,
                                              stats[:, rows])
        else:
            chunk, value, grad_logits = _torch_chunk(plan, logits, rows, objective, with_grad)
        del logits
        if grad_logits is not None and cap_slope is not None:
            grad_logits.mul_(cap_slope)  # ∂L/∂z → ∂L/∂u through the soft cap
        del cap_slope
        if value is not None:
            values.append(value)
        if grad_logits is not None:
            # the backward matmuls read the gradient in the weight's dtype (bf16 for a bf16 head)
            if slot is None:
                g = grad_logits.to(weight_mm.dtype)
            else:
                g = slot if grad_logits is slot else slot.copy_(grad_logits)
            if grads.hidden is not None:
                input_grad(g, weight_mm, out=grads.hidden[rows])
            if grads.bias is not None:
                grads.bias += grad_logits.sum(0)
            if pending is not None:
                pending.add(g, rows)
            # free this chunk's [c, V] gradient before the next chunk's logits exist
            del g
        del grad_logits
        if stats is None:
            for name, value in chunk.items():
                outputs[name][rows] = value
    if pending is not None:
        pending.flush()
    total = None
    if objective is not None:
        total = torch.stack(values).sum() if values else torch.zeros((), dtype=acc, device=hidden.device)
    return outputs, grads, total
