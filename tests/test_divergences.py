"""The registry against float64 brute force, its identities, limits and estimators."""

import math

import pytest
import torch

from fdivctl import divergences
from reference import ENTRIES, entry_id, reference_divergence, reference_full


def _logits(*shape, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def test_names_lists_every_entry():
    assert divergences.names() == ["fkl", "rkl", "jsd", "tv", "hellinger", "alpha", "skl", "srkl"]


@pytest.mark.parametrize("entry", ENTRIES, ids=entry_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_value_and_gradient_match_brute_force(entry, dtype):
    name, params = entry
    d = divergences.get(name, **params)
    s, t = _logits(6, 40, seed=1), _logits(6, 40, seed=2)
    s_ours = s.clone().to(dtype).requires_grad_(True)
    s_ref = s.clone().requires_grad_(True)
    ours = d.token_divergence(s_ours, t.to(dtype))
    ref = reference_full(name, params, s_ref, t)
    assert ours.shape == (6,)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(ours.double(), ref, atol=tol, rtol=tol)
    (g_ours,) = torch.autograd.grad(ours.sum(), s_ours)
    (g_ref,) = torch.autograd.grad(ref.sum(), s_ref)
    torch.testing.assert_close(g_ours.double(), g_ref, atol=tol * 10, rtol=tol * 10)


@pytest.mark.parametrize("entry", ENTRIES, ids=entry_id)
def test_zero_on_equal_and_nonnegative(entry):
    name, params = entry
    d = divergences.get(name, **params)
    s, t = _logits(50, 30, seed=3), _logits(50, 30, seed=4)
    assert d.token_divergence(s, s).abs().max() < 1e-12
    assert (d.token_divergence(s, t) >= -1e-12).all()


@pytest.mark.parametrize("name", ["tv", "hellinger"])
def test_bounded_by_one_even_for_disjoint_supports(name):
    d = divergences.get(name)
    s = torch.full((2, 6), -1e4, dtype=torch.float64)
    t = s.clone()
    s[:, :3] = 0.0
    t[:, 3:] = 0.0
    value = d.token_divergence(s, t)
    assert (value <= 1 + 1e-12).all()
    torch.testing.assert_close(value, torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("entry", ENTRIES, ids=entry_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_disjoint_supports_and_minus_inf_give_no_nan(entry, dtype):
    name, params = entry
    d = divergences.get(name, **params)
    s = torch.full((3, 8), -200.0, dtype=dtype)
    t = torch.full((3, 8), -200.0, dtype=dtype)
    s[:, :4] = torch.randn(3, 4, dtype=dtype)
    t[:, 4:] = torch.randn(3, 4, dtype=dtype)
    t[0, 0] = float("-inf")  # a padded vocabulary entry
    s[1, 7] = float("-inf")
    s.requires_grad_(True)
    value = d.token_divergence(s, t)
    (grad,) = torch.autograd.grad(value.sum(), s)
    assert not torch.isnan(value).any() and not torch.isnan(grad).any()
    # both probabilities underflow everywhere outside the supports: those terms give 0
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("entry", ENTRIES, ids=entry_id)
def test_temperature_divides_both_sides(entry):
    name, params = entry
    d = divergences.get(name, **params)
    s, t = _logits(4, 20, seed=5), _logits(4, 20, seed=6)
    torch.testing.assert_close(d.token_divergence(s, t, temperature=2.5), d.token_divergence(s / 2.5, t / 2.5))
    torch.testing.assert_close(
        d.token_divergence(s, t, temperature=0.7), reference_full(name, params, s, t, temperature=0.7)
    )


@pytest.mark.parametrize("entry", ENTRIES, ids=entry_id)
def test_generator_is_the_summand(entry):
    """Σ p f(q/p) with the entry's generator equals its closed form."""
    name, params = entry
    d = divergences.get(name, **params)
    log_q = torch.log_softmax(_logits(5, 12, seed=7), -1)
    log_p = torch.log_softmax(_logits(5, 12, seed=8), -1)
    via_generator = (log_p.exp() * d.generator(log_q - log_p)).sum(-1)
    torch.testing.assert_close(via_generator, reference_divergence(name, params, log_q, log_p))
    assert d.generator(torch.zeros(3, dtype=torch.float64)).abs().max() < 1e-15  # f(1) = 0


@pytest.mark.parametrize("entry", ENTRIES, ids=entry_id)
def test_reference_sample_loss_is_unbiased_with_zero_slope(entry):
    """E_p[f(u) − f'(1)(u − 1)] = D_f, and the estimator is flat at u = 1."""
    name, params = entry
    d = divergences.get(name, **params)
    log_q = torch.log_softmax(_logits(5, 12, seed=9), -1)
    log_p = torch.log_softmax(_logits(5, 12, seed=10), -1)
    expectation = (log_p.exp() * d.reference_sample_loss(log_q - log_p)).sum(-1)
    torch.testing.assert_close(expectation, reference_divergence(name, params, log_q, log_p))
    if name != "tv":
        x = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        (slope,) = torch.autograd.grad(d.reference_sample_loss(x).sum(), x)
        assert abs(float(slope)) < 1e-12


def test_dph_forward_kl_is_the_k3_shape():
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    u = x.exp()
    torch.testing.assert_close(divergences.get("fkl").reference_sample_loss(x), u - 1 - x)
    js = divergences.get("jsd", beta=0.5).reference_sample_loss(x)
    torch.testing.assert_close(2 * js, u * x - (u + 1) * torch.log((u + 1) / 2))


def test_jsd_beta_limits_are_the_kls():
    s, t = _logits(4, 15, seed=11), _logits(4, 15, seed=12)
    fkl = divergences.get("fkl").token_divergence(s, t)
    rkl = divergences.get("rkl").token_divergence(s, t)
    small = 1e-6
    torch.testing.assert_close(divergences.get("jsd", beta=small).token_divergence(s, t) / small, fkl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        divergences.get("jsd", beta=1 - small).token_divergence(s, t) / small, rkl, rtol=1e-4, atol=1e-6
    )


def test_alpha_limits_are_the_kls_and_half_is_hellinger():
    s, t = _logits(4, 15, seed=13), _logits(4, 15, seed=14)
    fkl = divergences.get("fkl").token_divergence(s, t)
    rkl = divergences.get("rkl").token_divergence(s, t)
    torch.testing.assert_close(divergences.get("alpha", alpha=1 - 1e-7).token_divergence(s, t), fkl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(divergences.get("alpha", alpha=1e-7).token_divergence(s, t), rkl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        divergences.get("alpha", alpha=0.5).token_divergence(s, t),
        4 * divergences.get("hellinger").token_divergence(s, t),
    )


def test_skew_kl_at_zero_is_plain_kl():
    s, t = _logits(3, 9, seed=15), _logits(3, 9, seed=16)
    torch.testing.assert_close(
        divergences.get("skl", lam=0.0).token_divergence(s, t), divergences.get("fkl").token_divergence(s, t)
    )
    torch.testing.assert_close(
        divergences.get("srkl", lam=0.0).token_divergence(s, t), divergences.get("rkl").token_divergence(s, t)
    )


def test_symmetric_entries_are_symmetric():
    s, t = _logits(3, 9, seed=17), _logits(3, 9, seed=18)
    for name in ("jsd", "tv", "hellinger"):
        d = divergences.get(name)
        torch.testing.assert_close(d.token_divergence(s, t), d.token_divergence(t, s))
    assert divergences.get("jsd").token_divergence(s, t).max() <= math.log(2)


# --- sample estimators of KL(q‖p) on tokens drawn from q ---------------------------------


def test_estimators_values():
    log_q = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    log_p = torch.tensor([-2.0, -1.0, -0.5], dtype=torch.float64)
    log_r = log_p - log_q
    expected = {
        "k1": -log_r,
        "k2": 0.5 * log_r**2,
        "k3": log_r.exp() - 1 - log_r,
        "abs": log_r.abs(),
        "k3+": log_r.exp() - 1 - log_r,
    }
    assert divergences.estimator_names() == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(divergences.sample_kl(log_q, log_p, name), value)


def test_k1_and_k3_are_unbiased_for_reverse_kl():
    log_q = torch.log_softmax(_logits(4, 10, seed=19), -1)
    log_p = torch.log_softmax(_logits(4, 10, seed=20), -1)
    exact = divergences.get("rkl").token_divergence(log_q, log_p)
    for name in ("k1", "k3"):
        expectation = (log_q.exp() * divergences.sample_kl(log_q, log_p, name)).sum(-1)
        torch.testing.assert_close(expectation, exact)


def test_straight_through_has_k3_value_and_k2_gradient():
    log_q = torch.tensor([-1.0, -2.5], dtype=torch.float64, requires_grad=True)
    log_p = torch.tensor([-2.0, -0.5], dtype=torch.float64)
    (g_st,) = torch.autograd.grad(divergences.sample_kl(log_q, log_p, "k3+").sum(), log_q)
    (g_k2,) = torch.autograd.grad(divergences.sample_kl(log_q, log_p, "k2").sum(), log_q)
    torch.testing.assert_close(g_st, g_k2)


def test_estimator_clamps_extreme_ratios():
    log_q = torch.tensor([-500.0], requires_grad=True)
    value = divergences.sample_kl(log_q, torch.tensor([0.0]), "k3")
    assert torch.isfinite(value).all()
    (grad,) = torch.autograd.grad(value.sum(), log_q)
    assert torch.isfinite(grad).all()


# --- the registry's errors -------------------------------------------------------------


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="unknown divergence 'kld'; valid: fkl, rkl, jsd"):
        divergences.get("kld")


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("jsd", {"beta": 0.0}, "beta must lie in the open interval"),
        ("jsd", {"beta": 1.0}, "beta must lie in the open interval"),
        ("alpha", {"alpha": 1.5}, "alpha must lie in the open interval"),
        ("skl", {"lam": 1.0}, r"lam must lie in \[0, 1\)"),
        ("jsd", {"alpha": 0.3}, "has no parameter 'alpha'; valid: beta"),
        ("fkl", {"beta": 0.3}, "has no parameter 'beta'; valid: none"),
    ],
)
def test_bad_parameters(name, params, message):
    with pytest.raises(ValueError, match=message):
        divergences.get(name, **params)


def test_unknown_estimator():
    with pytest.raises(ValueError, match="valid: k1, k2, k3, abs, k3\\+"):
        divergences.sample_kl(torch.zeros(1), torch.zeros(1), "k4")


def test_parse_spec():
    assert divergences.parse("jsd:beta=0.3").params == {"beta": 0.3}
    assert divergences.parse("fkl").name == "fkl"
    with pytest.raises(ValueError, match="expected key=value"):
        divergences.parse("jsd:0.3")
    with pytest.raises(ValueError, match="beta is given twice"):  # was: the last one, silently
        divergences.parse("jsd:beta=0.5,beta=0.2")


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        divergences.get("fkl").token_divergence(torch.zeros(2, 5), torch.zeros(2, 6))


@pytest.mark.parametrize("entry", ENTRIES, ids=entry_id)
def test_fprime_is_the_generators_derivative_and_differentiable(entry):
    """f′(u) = d f(u)/du at u = e^l, against a central difference of the generator; gradcheck of f′ in l."""
    name, params = entry
    d = divergences.get(name, **params)
    log_u = torch.tensor([-1.5, -0.2, 0.3, 1.1], dtype=torch.float64)
    u, h = log_u.exp(), 1e-6
    numeric = (d.generator(torch.log(u + h)) - d.generator(torch.log(u - h))) / (2 * h)
    torch.testing.assert_close(d.fprime(log_u), numeric, rtol=1e-6, atol=1e-8)
    torch.autograd.gradcheck(d.fprime, (log_u.clone().requires_grad_(True),))


def test_the_divergences_command_shows_an_unbounded_divergence_as_inf():
    """q has no mass where p has: KL(p‖q) is +∞ (the floored log 0 would print ~1e29); bounded ones stay finite."""
    from cli_runner import run_cli

    done = run_cli("divergences", "-d", "fkl", "-d", "tv", "--q", "1,0,0")
    assert done.returncode == 0, done.stderr
    rows = {line.split("│")[1].strip(): line.split("│")[-2].strip() for line in done.stdout.splitlines()
            if line.startswith("│ fkl") or line.startswith("│ tv")}
    assert rows == {"fkl": "inf", "tv": "0.400000"}, done.stdout
