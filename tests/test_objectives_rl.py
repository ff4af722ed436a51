"""The RL objectives against hand-computed values and exact divergences: GRPO family, estimators, DPH-RL, f-DPO."""

import math

import pytest
import torch
import torch.nn.functional as F

from fdivctl import divergences
from fdivctl.errors import UserError
from fdivctl.objectives import dph, fdpo, grpo
from fdivctl.stages.rl_options import RLOptions


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    adv = grpo.group_advantages(rewards, groups, std_norm=True)
    std = math.sqrt(1 / 3)  # rewards 1,0,0,1: mean 0.5, Bessel variance (4 · 0.25)/3
    expected = [0.5 / (std + 1e-6), -0.5 / (std + 1e-6), -0.5 / (std + 1e-6), 0.5 / (std + 1e-6), 0, 0, 0]
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-6)
    drgrpo = grpo.group_advantages(rewards, groups, std_norm=False)  # Dr.GRPO: centred only
    assert torch.allclose(drgrpo, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0]))


def test_equal_reward_groups_and_overlong_penalty():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    assert grpo.equal_reward_groups(rewards, groups).tolist() == [True, True, False, False, True, True]
    lengths = torch.tensor([10, 16, 18, 20, 25])
    # max 20, buffer 4: no penalty up to 16, linear to -1 at 20, -1 beyond (DAPO Eq. 13)
    assert torch.allclose(grpo.overlong_penalty(lengths, 20, 4), torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    assert grpo.overlong_penalty(lengths, 20, 0).abs().sum() == 0


def test_clipped_surrogate_by_hand():
    old = torch.zeros(4)
    logprob = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5]))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, clipped = grpo.clipped_surrogate(logprob, old, adv, clip_low=0.2, clip_high=0.28)
    # A>0: min(1.5, 1.28) = 1.28 (clipped); min(0.5, 0.8) = 0.5; A<0: min(-1.5, -1.28) = -1.5; min(-0.5, -0.8) = -0.8
    assert torch.allclose(loss, torch.tensor([-1.28, -0.5, 1.5, 0.8]), atol=1e-6)
    assert clipped.tolist() == [True, False, False, True]
    symmetric, _ = grpo.clipped_surrogate(logprob, old, adv, clip_low=0.2, clip_high=0.2)
    assert torch.allclose(symmetric, torch.tensor([-1.2, -0.5, 1.5, 0.8]), atol=1e-6)  # only clip-higher moved


def _autograd_surrogate(logprob, old, adv, clip_low, clip_high):
    """The surrogate as plain PyTorch ops, for autograd's gradient."""
    ratio = torch.exp((logprob - old).clamp(-20.0, 20.0))
    return -torch.minimum(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)


@pytest.mark.parametrize("clip", [(0.2, 0.28), (0.2, 0.2)])
def test_clipped_surrogate_gradient_is_autograds(clip):
    g = torch.Generator().manual_seed(0)
    n = 2000
    logprob = torch.randn(n, generator=g, dtype=torch.float64) * 0.3
    # on the clip bounds, ratio 1, log-ratios beyond ±20 and at 20, a zero advantage
    logprob[:6] = torch.tensor([0.0, math.log(1 - clip[0]), math.log(1 + clip[1]), 25.0, -25.0, 20.0])
    old = torch.zeros(n, dtype=torch.float64)
    old[10:20] = logprob[10:20]
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    adv[20:40] = 0.0
    # (beyond ±20 and at 20 with the unclipped branch the minimum, so that only the clamp decides)
    adv[:6] = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    cotangent = torch.randn(n, generator=g, dtype=torch.float64)
    ours = [logprob.clone().requires_grad_(), old.clone().requires_grad_()]
    theirs = [logprob.clone().requires_grad_(), old.clone().requires_grad_()]
    loss, _ = grpo.clipped_surrogate(*ours, adv, *clip)
    (loss * cotangent).sum().backward()
    expected = _autograd_surrogate(*theirs, adv, *clip)
    (expected * cotangent).sum().backward()
    assert torch.equal(loss.detach(), expected.detach())
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-12, atol=1e-12)
    assert (ours[0].grad[3:5] == 0).all()  # the ratio held at e^±20 passes no gradient
    assert ours[0].grad[5] != 0  # a log-ratio of exactly 20 still does (clamp's bounds are inclusive)


def test_clipped_surrogate_refuses_advantages_with_gradients():
    adv = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="advantages are constants"):
        grpo.clipped_surrogate(torch.zeros(3), torch.zeros(3), adv, 0.2, 0.2)


@pytest.mark.parametrize("agg", grpo.LOSS_AGGS)
def test_token_weights_by_hand(agg):
    per_token = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])  # response a: 1,2 ; response b: 3,4,5
    lengths = torch.tensor([2, 3])
    total = (grpo.token_weights(lengths, 5, 2, agg) * per_token).sum()
    expected = {"token-mean": 15 / 5, "seq-mean-token-sum": (3 + 12) / 2, "seq-mean-token-mean": (1.5 + 4) / 2}[agg]
    assert total.item() == pytest.approx(expected)
    # micro-batches add up to the minibatch aggregate
    halves = (grpo.token_weights(lengths[:1], 5, 2, agg) * per_token[:2]).sum() + \
        (grpo.token_weights(lengths[1:], 5, 2, agg) * per_token[2:]).sum()
    assert halves.item() == pytest.approx(expected)


def test_algo_presets_change_exactly_their_switches():
    grpo_opts = RLOptions(algo="grpo").resolve()
    dr = RLOptions(algo="drgrpo").resolve()
    dapo = RLOptions(algo="dapo").resolve()
    keys = ("clip_low", "clip_high", "loss_agg", "std_norm", "dynamic_sampling", "overlong_penalty")
    base = {k: getattr(grpo_opts, k) for k in keys}
    assert {k for k in keys if getattr(dr, k) != base[k]} == {"loss_agg", "std_norm"}
    assert dr.std_norm is False and dr.loss_agg == "seq-mean-token-sum"
    assert {k for k in keys if getattr(dapo, k) != base[k]} == {"clip_high", "loss_agg", "dynamic_sampling",
                                                                 "overlong_penalty"}
    assert dapo.clip_high == 0.28 and dapo.loss_agg == "token-mean" and dapo.dynamic_sampling
    explicit = RLOptions(algo="dapo", clip_high=0.2, dynamic_sampling=False).resolve()
    assert explicit.clip_high == 0.2 and not explicit.dynamic_sampling
    with pytest.raises(UserError):
        RLOptions(algo="grpo", divergence="fkl", div_estimator="k2").resolve().regularizer()


def _distributions(seed, vocab=7):
    g = torch.Generator().manual_seed(seed)
    return (torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64), 0),
            torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64), 0))


@pytest.mark.parametrize("name", ["rkl", "fkl", "jsd", "alpha", "hellinger"])
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_on_policy_estimators_match_the_exact_divergence(name, estimator):
    log_q, log_p = _distributions(0)
    n = 200_000
    samples = torch.multinomial(log_q.exp(), n, replacement=True, generator=torch.Generator().manual_seed(1))
    div = divergences.get(name)
    values = divergences.sample_divergence(div, log_q[samples], log_p[samples], estimator)
    exact = div.support_divergence(log_q, log_p)
    tolerance = 5 * values.std() / math.sqrt(n)
    assert abs(values.mean() - exact) < tolerance
    if name == "rkl":  # the same numbers as Schulman's k1/k3 on r = p/q
        assert torch.allclose(values, divergences.sample_kl(log_q[samples], log_p[samples], estimator))


@pytest.mark.parametrize("spec", ["fkl", "jsd", "alpha:alpha=0.2"])
def test_dph_generator_form(spec):
    div = divergences.parse(spec)
    log_p, log_q = _distributions(3)
    # π_θ = π_ref: zero loss, zero gradient
    theta = log_p.clone().requires_grad_(True)
    tokens = torch.arange(7)
    loss = dph.reference_loss(div, torch.log_softmax(theta, 0)[tokens], log_p[tokens]).mean()
    loss.backward()
    assert loss.abs().item() < 1e-12 and theta.grad.abs().max().item() < 1e-12
    # perturbed π_θ: the mean over reference samples y ~ π_ref matches the exact D_f(π_θ‖π_ref)
    n = 200_000
    samples = torch.multinomial(log_p.exp(), n, replacement=True, generator=torch.Generator().manual_seed(2))
    values = dph.reference_loss(div, log_q[samples], log_p[samples])
    exact = div.support_divergence(log_q, log_p)
    assert abs(values.mean() - exact) < 5 * values.std() / math.sqrt(n)
    if div.name == "fkl":  # E_p[u − 1 − log u] = KL(p‖q)
        assert exact == pytest.approx(float((log_p.exp() * (log_p - log_q)).sum()))


def test_dph_split_prompts():
    verdicts = {"a": [True] * 9, "b": [True] * 7 + [False, True], "c": [True] * 8 + [False], "d": [True] * 6 + [False] * 3}
    pef, exp = dph.split_prompts(verdicts, k=8, threshold=7 / 8)
    assert sorted(pef) == ["a", "b"] and sorted(exp) == ["c", "d"]


def test_fdpo_reverse_kl_is_dpo():
    g = torch.Generator().manual_seed(0)
    pw, pl, rw, rl = (torch.randn(6, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    beta = 0.3
    loss, figures = fdpo.fdpo_loss(divergences.get("rkl"), beta, pw, pl, rw, rl)
    dpo = -F.logsigmoid(beta * ((pw - rw) - (pl - rl))).mean()
    assert loss.item() == pytest.approx(dpo.item(), rel=1e-12)
    assert figures["reward_accuracy"] == pytest.approx(float((((pw - rw) - (pl - rl)) > 0).double().mean()))
    # TRL's DPO rewards β log u (before: β (log u + 1), 0.1 at the reference with --beta 0.1)
    assert figures["chosen_reward"] == pytest.approx(float(beta * (pw - rw).mean()), rel=1e-12)
    assert figures["rejected_reward"] == pytest.approx(float(beta * (pl - rl).mean()), rel=1e-12)


def test_fdpo_nll_term_is_rpo_by_hand():
    """Pang et al. 2024 Eq. 1: −log σ(β log u_w − β log u_l) − α log π_θ(y_w|x)/|y_w|, averaged over pairs."""
    g = torch.Generator().manual_seed(3)
    pw, pl, rw, rl = (torch.randn(4, generator=g, dtype=torch.float64) * 3 - 10 for _ in range(4))
    lengths = torch.tensor([5.0, 1.0, 12.0, 3.0], dtype=torch.float64)
    pw.requires_grad_(True)
    beta, alpha = 0.2, 0.7
    loss, figures = fdpo.fdpo_loss(divergences.get("rkl"), beta, pw, pl, rw, rl, lengths, alpha)
    dpo = -F.logsigmoid(beta * ((pw - rw) - (pl - rl)))
    direct = (dpo - alpha * pw / lengths).mean()
    assert loss.item() == pytest.approx(direct.item(), rel=1e-12)
    assert figures["chosen_nll"] == pytest.approx(float((-pw.detach() / lengths).mean()), rel=1e-12)
    assert figures["preference_loss"] == pytest.approx(float(dpo.detach().mean()), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, pw)
    margin = beta * ((pw - rw) - (pl - rl))
    by_hand = (-beta * torch.sigmoid(-margin) - alpha / lengths) / 4  # d/dlogπ(y_w) of each pair's term, / P
    torch.testing.assert_close(grad, by_hand.detach(), rtol=1e-12, atol=0)
    _, plain = fdpo.fdpo_loss(divergences.get("rkl"), beta, pw, pl, rw, rl)
    assert "chosen_nll" not in plain and "preference_loss" not in plain
    with pytest.raises(ValueError, match="needs the chosen responses' lengths"):
        fdpo.fdpo_loss(divergences.get("rkl"), beta, pw, pl, rw, rl, nll_coef=1.0)


@pytest.mark.parametrize("spec", ["rkl", "fkl", "jsd", "alpha:alpha=0.3"])
def test_fdpo_rewards_are_zero_at_the_reference(spec):
    same = torch.tensor([-3.0, -7.5], dtype=torch.float64)
    _, figures = fdpo.fdpo_loss(divergences.parse(spec), 0.1, same, same - 1, same, same - 1)
    assert figures["chosen_reward"] == 0 and figures["rejected_reward"] == 0 and figures["reward_margin"] == 0


@pytest.mark.parametrize("spec", ["fkl", "jsd", "alpha:alpha=0.3"])
def test_fdpo_matches_the_methods_formulas(spec):
    div = divergences.parse(spec)
    g = torch.Generator().manual_seed(1)
    pw, pl, rw, rl = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(4))
    beta = 0.5
    uw, ul = torch.exp(pw - rw), torch.exp(pl - rl)
    fprime = {  # METHODS.md §2.1 / Wang et al. 2023 Table 1
        "fkl": lambda u: -1 / u,
        "jsd": lambda u: torch.log(2 * u / (1 + u)),
        "alpha": lambda u: (1 - u ** (-0.3)) / 0.3,
    }[div.name]
    direct = -F.logsigmoid(beta * fprime(uw) - beta * fprime(ul)).mean()
    loss, _ = fdpo.fdpo_loss(div, beta, pw, pl, rw, rl)
    assert loss.item() == pytest.approx(direct.item(), rel=1e-10)
