"""The divergence-aware RL switches of issue #7 built on the GRPO family: APO (DADS, STCR), FG-ExPO's AKL and
SAFE's PID coefficient schedules, DGPO and f-DPG — each quantity by hand on a fixed batch, then staged runs."""

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from artifacts import staged_run, weights
from cli_runner import run_cli
from fdivctl import divergences
from fdivctl.objectives import apo, dgpo, fdpg, fdpo
from fdivctl.schedules.kl_control import KLCoefficient


def test_apo_dads_weight_and_stcr_scale_by_hand():
    torch.testing.assert_close(apo.dads_weight(torch.tensor([0.0, 0.25, 0.75, 1.0])),
                               torch.tensor([1.0, 1 - math.exp(-math.e * 0.75), 1 - math.exp(-math.e * 0.25), 1.0]))
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    correct = torch.tensor([True, False, False, False, False, False])
    advantages = torch.tensor([1.5, -0.5, -0.5, -0.5, 0.0, 0.0])
    # group 0 has accuracy 1/4 (difficulty 3/4): its positive response gets w(3/4), everything else 1
    torch.testing.assert_close(apo.divergence_scale(advantages, correct, groups),
                               torch.tensor([1 - math.exp(-math.e * 0.25), 1, 1, 1, 1, 1]))
    lengths = torch.tensor([10, 8, 30, 100010, 50, 60])
    # correct mean length 10: 8 is shorter (1), 30 is 20 over, 100010 is 1e5 over; group 1 has no correct answer
    expected = torch.tensor([1.0, 1.0, 2 - 1.00001 ** -20, 2 - 1.00001 ** -100000, 1.0, 1.0])
    torch.testing.assert_close(apo.stcr_scale(lengths, correct, groups), expected)


def test_akl_and_pid_coefficients_by_hand():
    akl = KLCoefficient("akl", base=0.04)
    assert akl.value(0.5) == pytest.approx(0.02)
    assert akl.value(0.8) == pytest.approx(0.04 / (1 + math.exp(-3.0)))
    assert akl.value(0.1) < akl.value(0.5) < akl.value(0.9)

    pid = KLCoefficient("pid", base=0.1, kl_threshold=0.3, target_entropy=2.0)
    assert pid.value(0.0) == 0.0  # no KL measured yet
    pid.update(divergence=5.0, entropy=1.0, reward=0.5)
    # K̄ = 0.5; first reward: PID 0, τ = 0.3; φ = 2/1.1
    assert pid.value(0.0) == pytest.approx(2 * 0.1 * (2 / 1.1) * (0.5 - 0.3))
    pid.update(divergence=5.0, entropy=3.9, reward=1.5)
    # K̄ = 0.95; reward EMA 0.5 → 0.55, error 0.049: PID = 0.3·0.049 + 0.01·0.049 + 0.05·0.049; φ = max(0.5, 2/4)
    threshold = 0.3 + 0.049 * (0.3 + 0.01 + 0.05)
    assert pid.state.threshold == pytest.approx(threshold)
    assert pid.value(0.0) == pytest.approx(2 * 0.1 * 0.5 * (0.95 - threshold))
    restored = KLCoefficient("pid", base=0.1)
    restored.load_state_dict(pid.state_dict())
    assert restored.value(0.0) == pid.value(0.0)


def test_dgpo_token_scale_by_hand():
    log_v = math.log(16)
    hellinger = torch.tensor([0.2, 0.0, 0.4, 0.3, 0.1])
    entropy = torch.tensor([0.5, 1.0, 0.25, 0.0, 0.0]) * log_v
    scale = dgpo.token_scale(hellinger, entropy, torch.tensor([3, 2]), 16, mix=0.5)
    # response 1: scores 0.1, 0, 0.1 (mean 1/15) → relative 1.5, 0, 1.5; response 2: zero entropy, scores 0 → 1
    torch.testing.assert_close(scale, torch.tensor([1.25, 0.5, 1.25, 1.0, 1.0]))
    assert float(scale[:3].sum()) == pytest.approx(3.0)  # the response's credit is moved, not created
    torch.testing.assert_close(dgpo.token_scale(hellinger, entropy, torch.tensor([3, 2]), 16, mix=0.0),
                               torch.ones(5))


def test_fdpg_fprime_matches_the_f_dpo_table():
    log_u = torch.tensor([-2.0, -0.3, 0.0, 0.7, 3.0], dtype=torch.float64)
    for spec in ("rkl", "fkl", "alpha:alpha=0.3"):
        div = divergences.parse(spec)
        torch.testing.assert_close(div.fprime(log_u), fdpo.fprime(div, log_u), msg=spec)
    jsd = divergences.parse("jsd:beta=0.3")  # f-DPO keeps the registry derivative divided by 1 − β
    torch.testing.assert_close(jsd.fprime(log_u), 0.7 * fdpo.fprime(jsd, log_u))


def test_fdpg_advantages_by_hand():
    groups = torch.tensor([0, 0, 0, 1, 1])
    policy = torch.tensor([-1.0, -2.0, -3.0, -1.0, -1.0])
    ref = torch.tensor([-1.5, -2.0, -2.0, -1.0, -1.0])
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0])
    beta = 0.5
    target = fdpg.log_target(ref, rewards, rewards > 0, "ref*exp(r/beta)", beta)
    advantages, log_u = fdpg.advantages(divergences.get("fkl"), policy, target, groups)
    log_w = (ref + rewards / beta - policy).double()
    z = log_w[:3].exp().mean()
    u = torch.exp(torch.log(z) - log_w[:3])
    slope = -1 / u  # forward KL: f′(u) = −1/u
    torch.testing.assert_close(advantages[:3], (-(slope - slope.mean())).float())
    # a group whose policy equals its target up to Z has u = 1 everywhere: no signal
    assert torch.allclose(advantages[3:], torch.zeros(2)) and torch.allclose(log_u[3:], torch.zeros(2))
    # the filter target: a rejected sample has p = 0 (log u clamped at 20), the kept one u = share of kept weight
    filtered, log_u = fdpg.advantages(divergences.get("fkl"), policy,
                                      fdpg.log_target(ref, rewards, rewards > 0, "ref*filter", beta), groups)
    assert float(log_u[1]) == 20.0 and filtered[:3].sum().abs() < 1e-6


# -- staged runs on the SFT policy's scored rollouts -------------------------------------------------------------

def test_apo_switches_change_the_update(task, scored_rollouts, tmp_path):
    base = ["--divergence", "rkl", "--div-coef", "0.5"]
    plain = staged_run(task, scored_rollouts, tmp_path / "grpo", *base)[0]
    shaped = staged_run(task, scored_rollouts, tmp_path / "apo", *base, "--dads", "--stcr")[0]
    table = pq.read_table(scored_rollouts)
    correct = torch.tensor(table.column("correct").to_pylist())
    lengths = torch.tensor([len(t) for t in table.column("completion_token_ids").to_pylist()])
    groups = torch.unique(torch.tensor([hash(p) for p in table.column("prompt_id").to_pylist()]),
                          return_inverse=True)[1]
    assert shaped["stcr_penalized"] == float((apo.stcr_scale(lengths, correct, groups) > 1).sum())
    assert shaped["loss"] != plain["loss"]


def test_akl_coefficient_follows_the_batch_accuracy(task, scored_rollouts, tmp_path):
    lines = staged_run(task, scored_rollouts, tmp_path / "akl", "--divergence", "rkl", "--div-coef-schedule", "akl",
                    "--ppo-epochs", 2)
    accuracy = np.mean(pq.read_table(scored_rollouts).column("correct").to_pylist())
    expected = 0.04 / (1 + math.exp(-10 * (accuracy - 0.5)))
    assert [x["div_coef"] for x in lines] == pytest.approx([expected, expected])


def test_pid_coefficient_starts_at_zero_and_follows_the_measured_kl(task, scored_rollouts, tmp_path):
    lines = staged_run(task, scored_rollouts, tmp_path / "pid", "--divergence", "rkl", "--div-coef-schedule", "pid",
                    "--kl-threshold", 0, "--ppo-epochs", 3, "--lr", "3e-2")
    assert lines[0]["div_coef"] == 0.0
    pid = KLCoefficient("pid", base=0.04, kl_threshold=0.0)
    reward = float(np.mean(pq.read_table(scored_rollouts).column("reward").to_pylist()))
    for before, after in zip(lines, lines[1:]):
        pid.update(before["divergence"], before["entropy"], reward)
        assert after["div_coef"] == pytest.approx(pid.value(0.0), rel=1e-6)
    assert lines[2]["div_coef"] > 0


def test_dgpo_with_the_policy_as_reference_is_grpo_and_a_reference_guides_it(task, scored_rollouts, tmp_path):
    """At the first step π_old = π_ref: every Hellinger deviation is 0, so the credit stays uniform (GRPO)."""
    grpo = staged_run(task, scored_rollouts, tmp_path / "grpo")[0]
    same = staged_run(task, scored_rollouts, tmp_path / "dgpo", "--algo", "dgpo")[0]
    a, b = weights(tmp_path / "grpo"), weights(tmp_path / "dgpo")
    assert all(torch.equal(a[k], b[k]) for k in a) and same["loss"] == grpo["loss"]
    guided = staged_run(task, scored_rollouts, tmp_path / "guided", "--algo", "dgpo", "--ref-model", task / "random",
                     "--dgpo-lambda", 1.0)[0]
    assert guided["loss"] != grpo["loss"] and "divergence" not in guided


@pytest.mark.parametrize("target", ["ref*exp(r/beta)", "ref*filter"])
def test_fdpg_trains_toward_its_target(task, scored_rollouts, tmp_path, target):
    (line,) = staged_run(task, scored_rollouts, tmp_path / "fdpg", "--algo", "fdpg", "--target", target,
                      "--beta", 0.5, "--divergence", "jsd")
    assert np.isfinite(line["loss"]) and "log_u" in line and line["grad_norm"] > 0


def test_method_switches_bad_input(task, scored_rollouts, tmp_path):
    cases = {
        "--algo dgpo has no KL penalty": ["--algo", "dgpo", "--divergence", "rkl"],
        "--target 'ref'; valid": ["--algo", "fdpg", "--target", "ref"],
        "--div-coef-schedule akl sets the coefficient of --divergence": ["--div-coef-schedule", "akl"],
        "--div-coef-schedule 'x'; valid: constant, akl, pid": ["--divergence", "rkl", "--div-coef-schedule", "x"],
        "use --div-in loss": ["--divergence", "rkl", "--div-coef-schedule", "pid", "--div-in", "reward"],
        "--dgpo-lambda must lie in [0, 1]": ["--algo", "dgpo", "--dgpo-lambda", 2],
        "--dads weights the divergence term in the loss": ["--dads"],
    }
    for message, args in cases.items():
        done = run_cli("train", task / "sft", tmp_path / "o", "--rollouts", scored_rollouts, *args, "--device", "cpu")
        assert done.returncode == 2 and message in done.stderr, (message, done.stderr)
        assert not (tmp_path / "o" / "model.safetensors").exists()
