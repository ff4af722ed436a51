"""The non-f distillation losses (PLD, SinKD, BD-KD) through the engine, against direct float64 computations."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from fdivctl import engine
from fdivctl.objectives.bdkd import BalancedKL
from fdivctl.objectives.kd import parse_loss
from fdivctl.objectives.pld import PlackettLuce
from fdivctl.objectives.sinkhorn import SinkhornDistance, sinkhorn_plan, squared_distance_cost


def _direct_pl(student_logits, teacher_logits, y, listed=None):
    """Plackett–Luce loss of one token, float64, by its definition: y first, then the others (or ``listed``)
    by descending teacher logit; the unlisted tokens stay in every denominator."""
    s = student_logits.double()
    p = torch.softmax(teacher_logits.double(), -1)
    others = [i for i in (range(len(s)) if listed is None else listed) if i != y]
    order = [y] + sorted(others, key=lambda i: -float(teacher_logits[i]))
    rest = [i for i in range(len(s)) if i not in order]
    loss = 0.0
    for k, item in enumerate(order):
        pool = order[k:] + rest
        loss -= float(p[item]) * (float(s[item]) - math.log(sum(math.exp(float(s[j])) for j in pool)))
    return loss


def _head(n=6, hidden=5, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, hidden, generator=g, dtype=torch.float64), torch.randn(vocab, hidden, generator=g,
            dtype=torch.float64), torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2)


def test_pld_full_vocabulary_equals_the_plackett_luce_likelihood():
    h, w, teacher = _head()
    y = torch.tensor([0, 3, 10, 3, 7, 1])
    loss = engine.divergence_loss(h, w, engine.FullLogits(teacher), PlackettLuce().bind(y), chunk_size=4)
    direct = np.mean([_direct_pl(h[i] @ w.T, teacher[i], int(y[i])) for i in range(len(y))])
    assert float(loss) == pytest.approx(direct, rel=1e-10)


def test_pld_from_a_top_k_store_lists_y_then_the_stored_ids():
    h, w, teacher = _head(seed=1)
    k = 4
    log_p = torch.log_softmax(teacher, -1)
    top_lp, ids = log_p.topk(k, -1)
    log_tail = torch.logsumexp(log_p.scatter(-1, ids, float("-inf")), -1)
    y = torch.stack([ids[0, 2], ids[1, 0], torch.tensor(0), torch.tensor(1), ids[4, 3], torch.tensor(2)])
    token_lp = log_p.gather(-1, y[:, None]).squeeze(-1)
    store = engine.TopK(ids, top_lp, log_tail)
    loss = engine.divergence_loss(h, w, store, PlackettLuce().bind(y, token_lp))
    direct = np.mean([_direct_pl(h[i] @ w.T, teacher[i], int(y[i]), ids[i].tolist()) for i in range(len(y))])
    assert float(loss) == pytest.approx(direct, rel=1e-10)
    with pytest.raises(ValueError, match="exact token log-probs"):
        outside = torch.tensor([int(i) for i in range(11) if i not in ids[0].tolist()][:1] * 6)
        engine.divergence_loss(h, w, store, PlackettLuce().bind(outside))


def test_pld_k_equal_to_vocabulary_equals_the_full_teacher():
    h, w, teacher = _head(seed=2)
    log_p = torch.log_softmax(teacher, -1)
    top_lp, ids = log_p.topk(w.shape[0], -1)
    y = torch.tensor([4, 4, 0, 9, 2, 5])
    sparse = engine.divergence_loss(h, w, engine.TopK(ids, top_lp, torch.full((6,), float("-inf"), dtype=torch.float64)),
                                    PlackettLuce().bind(y))
    dense = engine.divergence_loss(h, w, engine.FullLogits(teacher), PlackettLuce().bind(y))
    torch.testing.assert_close(sparse, dense)


def test_pld_gradient_matches_finite_differences():
    h, w, teacher = _head(n=3, vocab=7, seed=3)
    y = torch.tensor([1, 6, 0])
    h.requires_grad_(True)
    torch.autograd.gradcheck(
        lambda hh: engine.divergence_loss(hh, w, engine.FullLogits(teacher), PlackettLuce().bind(y),
                                          grad_mode="recompute"), (h,))


def _exact_ot(cost: np.ndarray) -> float:
    n, m = cost.shape
    rows = np.kron(np.eye(n), np.ones(m))
    cols = np.kron(np.ones(n), np.eye(m))
    result = linprog(cost.ravel(), A_eq=np.vstack([rows, cols]), b_eq=np.concatenate([np.full(n, 1 / n),
                     np.full(m, 1 / m)]), bounds=(0, None), method="highs")
    return float(result.fun)


def test_sinkhorn_converges_to_the_exact_transport_cost():
    g = torch.Generator().manual_seed(4)
    p = torch.softmax(torch.randn(5, 6, generator=g, dtype=torch.float64) * 2, -1)
    q = torch.softmax(torch.randn(5, 6, generator=g, dtype=torch.float64) * 2, -1)
    cost = squared_distance_cost(p, q)
    exact = _exact_ot(cost.numpy())
    coarse = float((sinkhorn_plan(cost, 0.05, 500) * cost).sum())
    fine = float((sinkhorn_plan(cost, 1e-3, 5000) * cost).sum())
    assert abs(fine - exact) < 2e-3 < abs(coarse - exact)
    plan = sinkhorn_plan(cost, 1e-3, 5000)  # a coupling: columns exact after the last update, rows converged
    torch.testing.assert_close(plan.sum(0), torch.full((5,), 0.2, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(plan.sum(1), torch.full((5,), 0.2, dtype=torch.float64), atol=1e-4, rtol=0)


def test_sinkhorn_loss_is_the_chunk_transport_cost():
    h, w, teacher = _head(n=8, seed=5)
    loss_fn = SinkhornDistance(eps=0.05, iters=50, batch=4, support_k=3)
    loss = engine.divergence_loss(h, w, engine.FullLogits(teacher), loss_fn)
    q = torch.softmax(h @ w.T, -1)
    p = torch.softmax(teacher, -1)
    costs = []
    for rows in (slice(0, 4), slice(4, 8)):
        lp_top, ids = p[rows].log().topk(3, -1)
        union = torch.unique(ids)
        teacher_on = torch.zeros(4, len(union), dtype=torch.float64)
        for i in range(4):
            for j in range(3):
                teacher_on[i, (union == ids[i, j]).nonzero()] = p[rows][i, ids[i, j]]
        full_t = torch.cat([teacher_on, 1 - teacher_on.sum(-1, keepdim=True)], -1)
        full_s = torch.cat([q[rows][:, union], 1 - q[rows][:, union].sum(-1, keepdim=True)], -1)
        cost = ((full_t[:, None, :] - full_s[None, :, :]) ** 2).sum(-1)
        costs.append(float((sinkhorn_plan(cost, 0.05, 50) * cost).sum()))
    assert float(loss) == pytest.approx(np.mean(costs), rel=1e-8)


def test_bdkd_weights_the_kl_directions_by_the_entropy_gap():
    h, w, teacher = _head(seed=6)
    mu = 3.0
    loss = engine.token_outputs(h, w, target=engine.FullLogits(teacher), divergence=BalancedKL(mu)).divergence
    log_q, log_p = torch.log_softmax(h @ w.T, -1), torch.log_softmax(teacher, -1)
    fkl = (log_p.exp() * (log_p - log_q)).sum(-1)
    rkl = (log_q.exp() * (log_q - log_p)).sum(-1)
    unsure = -(log_q.exp() * log_q).sum(-1) > -(log_p.exp() * log_p).sum(-1)
    assert 0 < int(unsure.sum()) < len(unsure)  # both branches are exercised
    torch.testing.assert_close(loss, torch.where(unsure, fkl + mu * rkl, mu * fkl + rkl))


def test_chunk_losses_take_the_pytorch_path_and_parse():
    assert isinstance(parse_loss("bdkd:mu=1.5"), BalancedKL)
    assert parse_loss("sinkhorn:eps=0.2,iters=5,batch=8").chunk_rows == 8
    from fdivctl.engine.sweep import resolve_kernel
    assert resolve_kernel("auto", torch.zeros(2, 2), None, PlackettLuce()) == "torch"
    with pytest.raises(ValueError, match="pld needs"):
        h, w, teacher = _head()
        engine.divergence_loss(h, w, engine.FullLogits(teacher), PlackettLuce())
