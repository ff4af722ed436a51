"""The public entry points of the loss engine.

* :func:`divergence_loss` — masked, weighted mean divergence between the
  student (hidden ``h [N, H]`` through the head ``W [V, H]``) and a target,
  with gradients for ``h``, ``W`` and the bias;
* :func:`token_outputs` — per-token log-prob of given ids, entropy, and
  divergence, each differentiable, from the same chunked pass;
* :func:`token_loss` — the sum over tokens of any per-token function of
  those outputs (the RL policy loss), gradient taken in the forward pass.

None ever holds the ``[N, V]`` student logits.  Two gradient strategies
(DESIGN.md, "the loss engine"):

* ``grad_mode="forward"`` (default for :func:`divergence_loss`; always for :func:`token_loss`): the chunk's
  gradient is taken during the forward pass and stored (``grad h`` ``[N, H]``,
  ``grad W`` fp32 ``[V, H]``); backward only scales them.  3 matmuls per chunk,
  6·N·H·V FLOPs; extra memory is the stored gradients.
* ``grad_mode="recompute"``: forward keeps nothing but the inputs; backward
  recomputes each chunk's logits.  4 matmuls, 8·N·H·V FLOPs, least memory.
  :func:`token_outputs` always recomputes, since its cotangents (the caller's
  use of the per-token values) are unknown at forward time.

Two kernels for a chunk's row work (``kernel=``, one of :data:`KERNELS`):
``"torch"`` — PyTorch ops and autograd on the chunk, the reference and the CPU
path; ``"triton"`` — two fused row kernels (:mod:`fdivctl.engine.triton_chunk`)
for every target kind (full logits, teacher heads and their mixtures, top-k stores); ``"auto"`` (default)
takes Triton on CUDA wherever it applies (not for a :class:`~fdivctl.engine.chunk_loss.ChunkLoss` or fp64).

``weight_grad_rows`` (``G``): rows of logit gradients gathered for one
weight-gradient GEMM ``grad W += gᵀ h`` (:class:`~fdivctl.engine.sweep.PendingWeightGrad`).
Default: on CUDA the whole chunks that fit in the hidden size (``G ≈ H``)
with the fp32 accumulator, in a quarter of it (``G ≈ H/4``) with the bf16 one,
a ``[G, V]`` bf16 buffer of at most half / a quarter of the accumulator's
bytes; one chunk on the CPU (:func:`default_weight_grad_rows`).

``softcap``: the student head's final-logit soft cap ``c`` (Gemma 2's ``final_logit_softcapping``): the
logits are ``c·tanh((h Wᵀ + b)/c)``, and each chunk's gradient is multiplied by the cap's slope before the
backward matmuls (:func:`~fdivctl.engine.matmul.soft_cap_`).  None (default): no cap.

``weight_grad_accum`` (:data:`~fdivctl.engine.sweep.WEIGHT_GRAD_ACCUM`): the
head's gradient accumulates across chunks in fp32 (default, DESIGN.md), or with
``"param"`` in the dtype the matmuls read the weight in — bf16 for a bf16 head
on CUDA, as Liger-Kernel does by default: half the ``[V, H]`` memory, one
rounding per chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fdivctl.divergences import Divergence, get
from fdivctl.engine.chunk_loss import ChunkLoss
from fdivctl.engine.matmul import check_softcap, matmul_weight
from fdivctl.engine.sweep import WEIGHT_GRAD_ACCUM, LinearObjective, Objective, SweepPlan, resolve_kernel, sweep
from fdivctl.engine.targets import Target
from fdivctl.engine.validation import (
    check_head,
    check_per_token,
    check_scalars,
    check_target,
    check_token_ids,
    check_weights,
)

GRAD_MODES = ("forward", "recompute")

# Elements of one [chunk, V] fp32 buffer when chunk_size is not given; a chunk
# holds a handful of such buffers at once (logits, log q, target, grad).
_CHUNK_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 22}
# GEMM tile rows a CUDA chunk is a multiple of
_GEMM_ROWS = 128


class TokenOutputs(NamedTuple):
    """Per-token results ``[N]`` of :func:`token_outputs`; ``None`` where not requested."""

    logprob: torch.Tensor | None
    entropy: torch.Tensor | None
    divergence: torch.Tensor | None


def default_chunk_size(n_tokens: int, vocab_size: int, device: torch.device) -> int:
    """Rows per chunk so that one ``[chunk, V]`` fp32 buffer stays near a fixed budget.

    On CUDA a multiple of :data:`_GEMM_ROWS` (when the budget allows one), so that the chunk's
    matmuls fill whole tiles (441 rows at V = 151936 ran 4 tiles of 128 for 3.45 tiles' work).
    """
    budget = _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS["cuda"])
    rows = max(8, budget // vocab_size)
    if device.type == "cuda" and rows >= _GEMM_ROWS:
        rows -= rows % _GEMM_ROWS
    return max(1, min(n_tokens, rows))


def default_weight_grad_rows(
    chunk_size: int, hidden_size: int, device: torch.device, weight_grad_accum: str = "fp32"
) -> int:
    """Logit-gradient rows ``G`` per weight-gradient GEMM on CUDA: the whole chunks that fit in ``H`` rows with the
    fp32 accumulator, in ``H/4`` rows with the bf16 one (``"param"``), at least one; one chunk elsewhere.

    Such a GEMM reads and writes the ``[V, H]`` accumulator for 2·G·V·H FLOPs: G/4 FLOP per byte in fp32, G/2 in
    bf16, against the ~300 bf16 FLOP per byte of HBM an H100 does, so a chunk of a few hundred rows leaves it bound
    by memory.  Measured on an H200 (fp32, jsd, N = 8192, V = 151936, ``bench/loss_engine.py``): G ≈ H took the
    step from 89–119 ms to 77 ms at H = 4096 and from 53–67 ms to 47 ms at H = 2048 (chunks of 256–512 rows).
    The bf16 accumulator is chosen to save memory, so its ``[G, V]`` buffer is held to a quarter of the
    accumulator: at H = 4096 two chunks of 384 rows (G/2 = 384 FLOP per byte, one chunk's 192 was below the
    ridge), at H = 2048 still one chunk.
    """
    if device.type != "cuda":
        return chunk_size
    rows = hidden_size if weight_grad_accum == "fp32" else hidden_size // 4
    return chunk_size * max(1, rows // chunk_size)


class _TokenOutputsFn(torch.autograd.Function):
    """Per-token outputs; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan):
        weight_mm = matmul_weight(weight)
        outputs, _, _ = sweep(hidden, weight_mm, bias, plan)
        ctx.save_for_backward(hidden, weight, bias)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        return tuple(outputs[name] for name in plan.outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        hidden, weight, bias = ctx.saved_tensors
        plan: SweepPlan = ctx.plan
        cotangents = {n: g for n, g in zip(plan.outputs, grad_outputs) if g is not None}
        needs = tuple(ctx.needs_input_grad[:3])
        if not cotangents or not any(needs):
            return None, None, None, None
        _, grads, _ = sweep(hidden, matmul_weight(weight), bias, plan, LinearObjective(cotangents), needs)
        return (
            grads.hidden,
            None if grads.weight is None else grads.weight.to(weight.dtype),
            None if grads.bias is None else grads.bias.to(bias.dtype),
            None,
        )


class _ObjectiveFn(torch.autograd.Function):
    """A per-token objective summed over tokens, with its gradient taken during the forward pass.

    Returns the objective and the plan's per-token outputs (detached); backward only scales
    the stored gradients by the objective's cotangent.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan, objective, grad_enabled):
        # under no_grad (evaluation) needs_input_grad still reflects requires_grad: take no gradient then
        needs = tuple(ctx.needs_input_grad[:3]) if grad_enabled else (False, False, False)
        outputs, grads, total = sweep(hidden, matmul_weight(weight), bias, plan, objective, needs)
        ctx.grads = (
            grads.hidden,
            None if grads.weight is None else grads.weight.to(weight.dtype),
            None if grads.bias is None else grads.bias.to(bias.dtype),
        )
        values = tuple(outputs[name] for name in plan.outputs)
        ctx.mark_non_differentiable(*values)
        return (total, *values)

    @staticmethod
    def backward(ctx, grad_total, *_):
        # the stored gradients are this call's own: scale them in place, no second [V, H] buffer
        scaled = tuple(None if g is None else g.mul_(grad_total.to(g.dtype)) for g in ctx.grads)
        ctx.grads = None
        return (*scaled, None, None, None)


def _plan(
    hidden, weight, bias, token_ids, entropy, target, divergence, temperature, chunk_size, kernel, weight_grad_accum,
    weight_grad_rows, softcap,
):
    check_head(hidden, weight, bias)
    check_scalars(temperature, chunk_size)
    check_softcap(softcap)
    if weight_grad_rows is not None and weight_grad_rows < 1:
        raise ValueError(f"weight_grad_rows must be ≥ 1, got {weight_grad_rows}")
    n_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    check_token_ids(token_ids, n_tokens, vocab_size)
    if (target is None) != (divergence is None):
        raise ValueError("target and divergence must be given together")
    check_target(target, n_tokens, vocab_size)
    if divergence is not None and not isinstance(divergence, ChunkLoss):
        divergence = get(divergence)
    if isinstance(divergence, ChunkLoss):
        divergence.validate(n_tokens, target)
    if weight_grad_accum not in WEIGHT_GRAD_ACCUM:
        raise ValueError(f"weight_grad_accum={weight_grad_accum!r}; valid: {', '.join(WEIGHT_GRAD_ACCUM)}")
    chunk_size = (
        chunk_size or getattr(divergence, "chunk_rows", None) or default_chunk_size(n_tokens, vocab_size, hidden.device)
    )
    return SweepPlan(
        token_ids=token_ids,
        entropy=entropy,
        target=target,
        divergence=divergence,
        temperature=float(temperature),
        chunk_size=chunk_size,
        kernel=resolve_kernel(kernel, hidden, target, divergence),
        weight_grad_accum=weight_grad_accum,
        weight_grad_rows=weight_grad_rows
        or default_weight_grad_rows(chunk_size, hidden.shape[1], hidden.device, weight_grad_accum),
        softcap=None if softcap is None else float(softcap),
    )


def token_outputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None,
    entropy: bool = False,
    target: Target | None = None,
    divergence: str | Divergence | ChunkLoss | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    kernel: str = "auto",
    weight_grad_accum: str = "fp32",
    weight_grad_rows: int | None = None,
    softcap: float | None = None,
) -> TokenOutputs:
    """Per-token ``log q(y_t)``, ``H(q_t)`` and ``D(q_t‖p_t)`` at ``temperature``, differentiable.

    ``q_t = softmax((h_t Wᵀ + b) / T)``.  Request any subset: ``token_ids``
    ``[N]`` for log-probs, ``entropy=True``, ``target`` with ``divergence``.
    Results are fp32 (fp64 for fp64 inputs).
    """
    plan = _plan(
        hidden, weight, bias, token_ids, entropy, target, divergence, temperature, chunk_size, kernel, weight_grad_accum,
        weight_grad_rows, softcap,
    )
    if not plan.outputs:
        raise ValueError("token_outputs: request token_ids, entropy=True, or a target with a divergence")
    values = dict(zip(plan.outputs, _TokenOutputsFn.apply(hidden, weight, bias, plan)))
    return TokenOutputs(*(values.get(name) for name in TokenOutputs._fields))


def divergence_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: Target,
    divergence: str | Divergence | ChunkLoss,
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    grad_mode: str = "forward",
    kernel: str = "auto",
    weight_grad_accum: str = "fp32",
    weight_grad_rows: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Masked weighted mean divergence ``Σ_t m_t w_t D(q_t‖p_t) / Σ_t m_t w_t``.

    ``mask`` ``[N]`` (bool; False rows are skipped entirely, never computed) and
    ``weights`` ``[N]`` (default 1) select and weight tokens.  When no token
    carries weight the loss is 0 with zero gradients.  The result is an fp32
    scalar (fp64 for fp64 inputs).
    """
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode={grad_mode!r}; valid: {', '.join(GRAD_MODES)}")
    plan = _plan(
        hidden, weight, bias, None, False, target, divergence, temperature, chunk_size, kernel, weight_grad_accum,
        weight_grad_rows, softcap,
    )
    n_tokens = hidden.shape[0]
    check_per_token("mask", mask, n_tokens)
    check_weights(weights, n_tokens)
    if mask is not None:
        rows = mask.to(torch.bool).nonzero().squeeze(-1)
        if rows.numel() < n_tokens:
            hidden = hidden[rows]
            plan.target = target.take(rows)
            if isinstance(plan.divergence, ChunkLoss):
                plan.divergence = plan.divergence.take(rows)
            weights = None if weights is None else weights[rows]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    coef = (
        torch.ones(hidden.shape[0], dtype=acc, device=hidden.device)
        if weights is None
        else weights.to(acc)
    )
    total = coef.sum()
    if hidden.shape[0] == 0 or total == 0:
        return (hidden.sum() * 0 + weight.sum() * 0).to(acc)
    coef = coef / total
    if grad_mode == "forward":
        return _ObjectiveFn.apply(
            hidden, weight, bias, plan, LinearObjective({"divergence": coef}), torch.is_grad_enabled()
        )[0]
    (per_token,) = _TokenOutputsFn.apply(hidden, weight, bias, plan)
    return (per_token * coef).sum()


def token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    objective: Objective,
    *,
    bias: torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None,
    entropy: bool = False,
    target: Target | None = None,
    divergence: str | Divergence | ChunkLoss | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    kernel: str = "auto",
    weight_grad_accum: str = "fp32",
    weight_grad_rows: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, TokenOutputs]:
    """``Σ_t ℓ_t`` for a per-token loss of the per-token outputs, gradient taken in the forward pass.

    ``objective(outputs, rows)`` gets a chunk's requested outputs (``"logprob"``,
    ``"entropy"``, ``"divergence"``, each ``[c]``, differentiable) and the chunk's
    ``rows`` (a slice into ``[N]``, to index per-token constants such as
    advantages) and returns the chunk's summed loss.  This is the RL policy
    loss's path: 4 matmuls per chunk (forward, target, grad h, grad W) and no
    recompute, as :func:`divergence_loss` in ``"forward"`` mode.  Returns the
    loss (differentiable in ``hidden``, ``weight``, ``bias``) and the detached
    per-token outputs, for logging.
    """
    plan = _plan(
        hidden, weight, bias, token_ids, entropy, target, divergence, temperature, chunk_size, kernel, weight_grad_accum,
        weight_grad_rows, softcap,
    )
    if not plan.outputs:
        raise ValueError("token_loss: request token_ids, entropy=True, or a target with a divergence")
    total, *values = _ObjectiveFn.apply(hidden, weight, bias, plan, objective, torch.is_grad_enabled())
    named = dict(zip(plan.outputs, values))
    return total, TokenOutputs(*(named.get(name) for name in TokenOutputs._fields))
