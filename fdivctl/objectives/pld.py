"""Plackett–Luce distillation (PLD): a list-wise ranking loss weighted by the teacher.

Source: Bassam, Zhu & Bian, "PLD: A Choice-Theoretic List-Wise Knowledge
Distillation" (arXiv 2506.12542).  The teacher's logits are Plackett–Luce
"worth" scores; the target ranking π* puts the true token y first, then every
other token by descending teacher logit, and each rank k is weighted by the
teacher's probability of the item placed there:

    L = − Σ_k α_k [ s_{π*_k} − log Σ_{j ≥ k} exp(s_{π*_j}) ],   α_k = p(π*_k)

with s the student's (tempered) logits; it is translation-invariant, so
``log q`` serves as ``s``.  The inner sums are suffix log-sum-exps over the
sorted list.  With a full teacher (model or full logits) the list is the whole
vocabulary.  With a top-k store the list is y followed by the stored ids (y
removed where it is among them), and every unlisted token stays in each
suffix sum as one "rest" mass (METHODS.md §2.2: "top-k list + tail in
practice"); the weight of y when it is outside the top-k is its exact stored
log-prob, which the store keeps for every sequence token.
"""

from __future__ import annotations

import torch

from fdivctl.divergences.logspace import LOG_FLOOR
from fdivctl.engine.chunk_loss import ChunkLoss
from fdivctl.engine.targets import Target, TopK


def plackett_luce_loss(log_s: torch.Tensor, alpha: torch.Tensor, log_rest: torch.Tensor | None = None) -> torch.Tensor:
    """``−Σ_k α_k (s_k − log(Σ_{j≥k} e^{s_j} + e^{rest}))`` per row, for items already in ranked order ``[c, m]``."""
    scores = log_s if log_rest is None else torch.cat((log_s, log_rest.unsqueeze(-1)), dim=-1)
    suffix = torch.logcumsumexp(scores.flip(-1), dim=-1).flip(-1)[:, : log_s.shape[-1]]
    return -(alpha * (log_s - suffix)).sum(-1)


class PlackettLuce(ChunkLoss):
    """PLD as an engine loss; :meth:`bind` gives it the batch's true tokens (and, for a store, their teacher log-probs)."""

    name = "pld"

    def __init__(self, token_ids: torch.Tensor | None = None, teacher_token_logprob: torch.Tensor | None = None):
        self.token_ids = token_ids
        self.teacher_token_logprob = teacher_token_logprob

    def bind(self, token_ids: torch.Tensor, teacher_token_logprob: torch.Tensor | None = None) -> PlackettLuce:
        return PlackettLuce(token_ids, teacher_token_logprob)

    def take(self, index):
        logprob = self.teacher_token_logprob
        return PlackettLuce(self.token_ids[index], None if logprob is None else logprob[index])

    def validate(self, n_tokens, target):
        if self.token_ids is None or tuple(self.token_ids.shape) != (n_tokens,):
            raise ValueError(f"pld needs the {n_tokens} true tokens: PlackettLuce().bind(token_ids)")

    def chunk_values(self, log_q, target: Target, rows, temperature):
        y = self.token_ids[rows].long().unsqueeze(-1)
        if isinstance(target, TopK):
            return self._top_k(log_q, target, rows, temperature, y)
        _, log_p = target.support(rows, log_q, temperature)  # full vocabulary
        key = log_p.detach().scatter(-1, y, float("inf"))
        order = key.argsort(dim=-1, descending=True)
        return plackett_luce_loss(log_q.gather(-1, order), log_p.gather(-1, order).exp())

    def _top_k(self, log_q, target: TopK, rows, temperature, y):
        ids = target.ids[rows].long()
        k = ids.shape[1]
        log_p_top = target.support(rows, log_q, temperature)[1][:, :k]
        is_y = ids == y
        outside = ~is_y.any(-1)
        log_p_y = (log_p_top * is_y).sum(-1)
        if bool(outside.any()):
            if self.teacher_token_logprob is None or temperature != target.temperature:
                raise ValueError("pld with a top-k store needs the teacher's exact token log-probs and "
                                 f"--temperature equal to the store's ({target.temperature:g}) when a true "
                                 "token lies outside the stored top-k")
            log_p_y = torch.where(outside, self.teacher_token_logprob[rows].to(log_q.dtype), log_p_y)
        key = log_p_top.detach().masked_fill(is_y, float("-inf"))  # y's duplicate sorts last, weight 0
        order = key.argsort(dim=-1, descending=True)
        ranked_ids = ids.gather(-1, order)
        dropped = is_y.gather(-1, order)
        log_s = torch.cat((log_q.gather(-1, y), log_q.gather(-1, ranked_ids).masked_fill(dropped, LOG_FLOOR)), -1)
        alpha = torch.cat((log_p_y.exp().unsqueeze(-1), log_p_top.gather(-1, order).exp().masked_fill(dropped, 0)), -1)
        listed = torch.cat((y, ids), -1)
        log_rest = torch.logsumexp(log_q.scatter(-1, listed, LOG_FLOOR), dim=-1)
        return plackett_luce_loss(log_s, alpha, log_rest)
