"""Sparse top-k summaries of a head's distribution, chunk by chunk (no gradients).

For each token row ``t`` with ``log p_t = log_softmax((h_t Wᵀ + b) / T)``:

* ``ids``, ``logprobs`` — the k most probable ids and their log-probs;
* ``log_tail``          — ``log(1 − Σ_topk p) = logsumexp`` of the other ids'
  log-probs, computed directly (no cancellation; ``−inf`` when k = V);
* ``token_logprob``     — ``log p_t(y_t)`` of a given token, which may lie
  outside the top-k (the reference log-prob RL objectives need).

This is what the logit store keeps (DESIGN.md, "Logit store"); the engine's
:class:`~fdivctl.engine.targets.TopK` reads it back as a k+1-bucket target.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fdivctl.engine.fused import default_chunk_size
from fdivctl.engine.matmul import check_softcap, linear_fp32, matmul_weight, soft_cap_
from fdivctl.engine.sweep import resolve_kernel


class TopKSummary(NamedTuple):
    ids: torch.Tensor  # int32 [N, k]
    logprobs: torch.Tensor  # fp32 [N, k]
    log_tail: torch.Tensor  # fp32 [N]
    token_logprob: torch.Tensor  # fp32 [N]


@torch.no_grad()
def head_topk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    token_ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    kernel: str = "auto",
    softcap: float | None = None,
) -> TopKSummary:
    """Top-k ids/log-probs, log tail mass and the given tokens' log-probs for rows of ``hidden``.

    ``kernel``: ``"torch"`` (``torch.topk``, a scatter and ``logsumexp``), ``"triton"``
    (:mod:`fdivctl.engine.triton_topk`: one pass compacting the candidates and summing the tail), or
    ``"auto"`` (Triton on CUDA), as in :func:`fdivctl.engine.divergence_loss`.  ``softcap``: the head's
    final-logit soft cap (:func:`~fdivctl.engine.matmul.soft_cap_`), applied before the temperature.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    if not 1 <= k <= vocab:
        raise ValueError(f"k={k} must lie in [1, {vocab}] (the head's vocabulary size)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_softcap(softcap)
    use_triton = resolve_kernel(kernel, hidden, None) == "triton"
    weight_mm = matmul_weight(weight)
    # no gradients: a chunk holds only its logits, so it can be 4× the engine's default
    chunk = chunk_size or 4 * default_chunk_size(n, vocab, hidden.device)
    device = hidden.device
    out = TopKSummary(
        torch.empty(n, k, dtype=torch.int32, device=device),
        torch.empty(n, k, dtype=torch.float32, device=device),
        torch.empty(n, dtype=torch.float32, device=device),
        torch.empty(n, dtype=torch.float32, device=device),
    )
    inexact = torch.zeros(n, dtype=torch.bool, device=device) if use_triton else None
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        logits = linear_fp32(hidden[rows], weight_mm, bias).float()
        soft_cap_(logits, softcap)
        token_logit = logits.gather(-1, token_ids[rows].long().unsqueeze(-1)).squeeze(-1) / temperature
        if use_triton:
            from fdivctl.engine import triton_topk

            raw_top, ids, lse, log_tail, inexact[rows] = triton_topk.chunk_summary(logits, k, temperature)
            top = raw_top / temperature  # the order does not depend on T > 0
        else:
            if temperature != 1.0:
                logits /= temperature
            top, ids, lse_rest = _topk_and_tail(logits, k)
            lse = torch.logaddexp(lse_rest, torch.logsumexp(top, dim=-1))
            log_tail = lse_rest - lse
        out.ids[rows] = ids.to(torch.int32)
        out.logprobs[rows] = top - lse.unsqueeze(-1)
        out.token_logprob[rows] = token_logit - lse
        out.log_tail[rows] = log_tail
    if use_triton:
        # very flat rows the Triton top-k could not hold: redone exactly, one host synchronisation per call
        redo = inexact.nonzero().squeeze(-1)
        if redo.numel():
            again = head_topk(hidden[redo], weight, k, token_ids[redo], bias=bias, temperature=temperature,
                              chunk_size=chunk, kernel="torch", softcap=softcap)
            for mine, exact in zip(out, again):
                mine[redo] = exact
    return out


def _topk_and_tail(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k values and ids of each row, and ``lse_rest``, the logsumexp of the other entries.

    One ``topk`` of k+1 (its last value is the largest of the rest, the shift that makes the tail sum exact:
    its largest term is exp(0) = 1, so nothing underflows however small the tail is), then one in-place
    pass over the row: the top-k set to −inf, minus the shift, ``exp_``, summed. Overwrites ``logits``;
    no ``[c, V]`` temporary and no separate max pass (what ``torch.logsumexp`` would add).
    """
    if k == logits.shape[-1]:
        top, ids = logits.topk(k, dim=-1)
        return top, ids, torch.full_like(top[:, 0], float("-inf"))
    top, ids = logits.topk(k + 1, dim=-1)
    shift = top[:, k:]
    top, ids = top[:, :k], ids[:, :k]
    total = logits.scatter_(-1, ids, float("-inf")).sub_(shift).exp_().sum(dim=-1)
    lse_rest = shift.squeeze(-1) + total.log()
    # a rest of −inf logits only (a −inf bias): −inf − (−inf) gave NaN above
    return top, ids, torch.where(torch.isneginf(shift.squeeze(-1)), float("-inf"), lse_rest)
