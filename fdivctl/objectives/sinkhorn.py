"""SinKD: the Sinkhorn distance between teacher and student, batch-wise.

Source: Cui et al., "Sinkhorn Distance Minimization for Knowledge
Distillation" (LREC-COLING 2024, arXiv 2402.17110).  Instead of comparing each
token's two distributions alone, SinKD transports the batch's teacher
distributions onto the batch's student distributions: with ``P_i`` the
teacher's and ``Q_j`` the student's distribution at tokens i, j of a batch of
c tokens, uniform marginals ``a = b = 1/c`` and a cost ``C_ij`` between the two
distributions, the entropic OT plan (Cuturi 2013)

    π = argmin_{π ∈ Π(a, b)} ⟨π, C⟩ − ε H(π)

is found by ``iters`` log-domain Sinkhorn iterations and the loss is
``⟨π, C⟩`` (gradients through the iterations).  On an LLM vocabulary both
distributions are written on the union of the batch's teacher top-k ids
(METHODS.md §2.2) plus one bucket for the rest of each distribution's mass,
and ``C_ij = ‖P_i − Q_j‖²`` (squared Euclidean; the paper's exact cost is not
given in METHODS.md, this choice is ours and documented).  The batch is the
engine chunk: ``batch`` tokens (the last chunk may be smaller); per token the
engine gets ``c · Σ_j π_ij C_ij`` so that the mean over the chunk is ``⟨π, C⟩``.
"""

from __future__ import annotations

import math

import torch

from fdivctl.divergences.logspace import LOG_FLOOR
from fdivctl.engine.chunk_loss import ChunkLoss
from fdivctl.engine.targets import Target, TopK


def sinkhorn_plan(cost: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """The entropic OT plan ``[n, m]`` between uniform marginals for ``cost``, by log-domain Sinkhorn."""
    n, m = cost.shape
    log_a, log_b = -math.log(n), -math.log(m)
    f = cost.new_zeros(n)
    g = cost.new_zeros(m)
    for _ in range(iters):
        f = eps * (log_a - torch.logsumexp((g.unsqueeze(0) - cost) / eps, dim=1))
        g = eps * (log_b - torch.logsumexp((f.unsqueeze(1) - cost) / eps, dim=0))
    return torch.exp((f.unsqueeze(1) + g.unsqueeze(0) - cost) / eps)


def squared_distance_cost(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``C_ij = ‖p_i − q_j‖²`` for rows of ``p [n, S]`` and ``q [m, S]``, without an ``[n, m, S]`` buffer."""
    cost = (p * p).sum(-1, keepdim=True) + (q * q).sum(-1).unsqueeze(0) - 2.0 * p @ q.T
    return cost.clamp_min(0.0)


class SinkhornDistance(ChunkLoss):
    """SinKD over chunks of ``batch`` tokens; ``support_k`` teacher ids per token for full-vocabulary teachers."""

    name = "sinkhorn"

    def __init__(self, eps: float = 0.1, iters: int = 20, batch: int = 256, support_k: int = 64):
        if not eps > 0 or iters < 1 or batch < 2 or support_k < 1:
            raise ValueError(f"sinkhorn: need eps > 0, iters ≥ 1, batch ≥ 2, support_k ≥ 1; got eps={eps}, "
                             f"iters={iters}, batch={batch}, support_k={support_k}")
        self.eps, self.iters, self.support_k = float(eps), int(iters), int(support_k)
        self.chunk_rows = int(batch)

    def chunk_values(self, log_q, target: Target, rows, temperature):
        if isinstance(target, TopK):
            ids = target.ids[rows].long()
            log_p_top = target.support(rows, log_q, temperature)[1][:, : ids.shape[1]]
        else:
            _, log_p = target.support(rows, log_q, temperature)
            log_p_top, ids = log_p.topk(min(self.support_k, log_p.shape[-1]), dim=-1)
        union = torch.unique(ids)
        teacher = log_q.new_zeros(log_q.shape[0], union.numel())
        teacher.scatter_(-1, torch.searchsorted(union, ids), log_p_top.detach().exp())
        teacher_rest = (1.0 - teacher.sum(-1, keepdim=True)).clamp_min(0.0)
        student = log_q[:, union].exp()
        student_rest = torch.logsumexp(log_q.index_fill(-1, union, LOG_FLOOR), dim=-1, keepdim=True).exp()
        cost = squared_distance_cost(torch.cat((teacher, teacher_rest), -1), torch.cat((student, student_rest), -1))
        plan = sinkhorn_plan(cost, self.eps, self.iters)
        return cost.shape[0] * (plan * cost).sum(-1)

    def __repr__(self) -> str:
        return f"sinkhorn(eps={self.eps}, iters={self.iters}, batch={self.chunk_rows}, support_k={self.support_k})"
