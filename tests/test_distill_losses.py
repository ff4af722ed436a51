"""The non-f distillation losses (PLD, SinKD, BD-KD) and the f-divergence SFT losses through the engine, against
direct float64 computations."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from fdivctl import divergences, engine
from fdivctl.objectives.bdkd import BalancedKL
from fdivctl.objectives.fsft import FDivergenceSFT
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


# -- f-divergence SFT (objectives/fsft.py) -------------------------------------------------------------------------

def _sft_by_hand(name: str, log_q: torch.Tensor, log_p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """−f′(u_y) + Σ_v p_v f*(f′(u_v)), f*(f′(u)) = u f′(u) − f(u), with each f and f′ written out (float64)."""
    u = torch.exp(log_q - log_p)
    if name == "hellinger":  # f = (√u − 1)²/2
        f, fprime = (u.sqrt() - 1).square() / 2, (1 - u.rsqrt()) / 2
    elif name == "jsd":  # β = 1/2: f = ½[u log u − (1 + u) log((1 + u)/2)]
        f = 0.5 * (u * u.log() - (1 + u) * torch.log((1 + u) / 2))
        fprime = 0.5 * (u.log() - torch.log((1 + u) / 2))
    else:
        raise ValueError(name)
    conjugate = u * fprime - f
    return -fprime.gather(-1, y[:, None]).squeeze(-1) + (log_p.exp() * conjugate).sum(-1)


@pytest.mark.parametrize("name, spec", [("hellinger", "hellinger"), ("jsd", "jsd:beta=0.5")])
def test_f_sft_equals_the_fenchel_bound_by_hand_value_and_gradient(name, spec):
    h, w, reference = _head()
    y = torch.tensor([0, 3, 10, 3, 7, 1])
    hidden = h.clone().requires_grad_(True)
    ours = engine.divergence_loss(hidden, w, engine.FullLogits(reference), parse_loss(f"sft-{spec}").bind(y))
    (grad_ours,) = torch.autograd.grad(ours, hidden)
    hidden = h.clone().requires_grad_(True)
    log_q, log_p = torch.log_softmax(hidden @ w.T, -1), torch.log_softmax(reference, -1)
    direct = _sft_by_hand(name, log_q, log_p, y).mean()
    (grad_direct,) = torch.autograd.grad(direct, hidden)
    torch.testing.assert_close(ours, direct, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_direct, rtol=1e-8, atol=1e-10)
    with torch.no_grad():  # evaluation: the same value without a graph
        evaluated = engine.divergence_loss(h, w, engine.FullLogits(reference), parse_loss(f"sft-{spec}").bind(y))
    torch.testing.assert_close(evaluated, direct.detach(), rtol=1e-10, atol=1e-12)


def test_f_sft_with_reverse_kl_is_plain_sft():
    """f = u log u: the reference term Σ_v π_ref f*(f′(u_v)) = Σ_v π_θ(v) = 1 is constant (the paper's point), so
    the loss is −log π_θ(y) + log π_ref(y) and its gradient is cross-entropy's."""
    h, w, reference = _head(seed=3)
    y = torch.tensor([2, 2, 5, 9, 0, 4])
    hidden = h.clone().requires_grad_(True)
    ours = engine.divergence_loss(hidden, w, engine.FullLogits(reference), parse_loss("sft-rkl").bind(y))
    (grad_ours,) = torch.autograd.grad(ours, hidden)
    hidden = h.clone().requires_grad_(True)
    log_q = torch.log_softmax(hidden @ w.T, -1).gather(-1, y[:, None]).squeeze(-1)
    log_p = torch.log_softmax(reference, -1).gather(-1, y[:, None]).squeeze(-1)
    ce = -log_q.mean()
    (grad_ce,) = torch.autograd.grad(ce, hidden)
    torch.testing.assert_close(ours, ce + log_p.mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_ce, rtol=1e-10, atol=1e-12)


def test_f_sft_push_on_the_demonstrated_token_fades_as_the_policy_leaves_the_reference():
    """With log q as free variables, ∂ℓ/∂log q_y = −u_y f″(u_y)(1 − q_y): squared Hellinger (u f″(u) = ¼ u^−½)
    pushes y by ¼ √(p_y/q_y)(1 − q_y), which fades as π(y) grows past π_ref(y) (plain SFT pushes by 1 − q_y)."""
    loss = FDivergenceSFT(divergences.get("hellinger")).bind(torch.tensor([0]))
    log_p = torch.log(torch.tensor([[0.1, 0.6, 0.3]], dtype=torch.float64))
    for q_y, push in ((0.1, 0.25 * 0.9), (0.4, 0.25 * 0.5 * 0.6)):
        log_q = torch.log(torch.tensor([[q_y, (1 - q_y) * 2 / 3, (1 - q_y) / 3]], dtype=torch.float64))
        log_q.requires_grad_(True)
        value = loss.chunk_values(log_q, engine.FullLogits(log_p), slice(0, 1), 1.0)
        (grad,) = torch.autograd.grad(value.sum(), log_q)
        assert -float(grad[0, 0]) == pytest.approx(push, rel=1e-10)


def test_f_sft_refuses_an_unbounded_divergence_and_a_store():
    with pytest.raises(ValueError, match="f\\(0\\) = ∞"):
        parse_loss("sft-fkl")
    top = engine.TopK(torch.zeros(4, 2, dtype=torch.int32), torch.full((4, 2), -1.0), torch.full((4,), -1.0))
    with pytest.raises(ValueError, match="not a top-k store"):
        FDivergenceSFT(divergences.get("jsd")).bind(torch.zeros(4, dtype=torch.long)).validate(4, top)
