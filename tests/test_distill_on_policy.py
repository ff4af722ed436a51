"""On-policy distillation on tiny random Qwen2 models: OPD/vOPD, GKD-style divergences, resume, PACED, TCOD, eval."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from cli_runner import run_cli
from fdivctl import tiny
from fdivctl.errors import UserError
from fdivctl.schedules.depth import assistant_header, exposed_turns, turns_from_chat_template
from fdivctl.schedules.paced import paced_weights
from fdivctl.stages.distill import DistillOptions, OnPolicyOptions, prepare_distill, run_distill
from fdivctl.training.loop import LoopOptions


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer_dir):
    path = tmp_path_factory.mktemp("student")
    tiny.make_model(path, AutoTokenizer.from_pretrained(tokenizer_dir), seed=5, hidden=64, layers=1)
    return path


@pytest.fixture(scope="module")
def sharp_teacher(tmp_path_factory, tiny_teacher):
    """The tiny teacher with its final norm scaled ×6: peaked distributions, far from the student's."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("sharp_teacher")
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    with torch.no_grad():
        model.get_decoder().norm.weight.mul_(6.0)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    texts = ["2 digits sum 9:", "3 digits sum 14:", "the cat", "a b c", "hello", "7 + 8 ="]
    pq.write_table(pa.table({"prompt_id": [f"q{i}" for i in range(len(texts))], "prompt": texts,
                             "pass_rate": [0.0, 0.25, 0.5, 0.75, 1.0, 0.5]}), path)
    return path


def _opts(tmp_path, loss=None, steps=2, baseline="none", **extra):
    loop = LoopOptions(lr=3e-3, lr_schedule="constant", batch_size=3, max_steps=steps, log_jsonl=tmp_path / "log.jsonl",
                       **extra.pop("loop", {}))
    online = OnPolicyOptions(samples_per_prompt=2, max_new_tokens=6, baseline=baseline,
                             baseline_topk=extra.pop("baseline_topk", None))
    return DistillOptions(loss=loss, device="cpu", on_policy=online, loop=loop, **extra)


def _log(tmp_path):
    return [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss,baseline", [(None, "none"), (None, "vopd"), ("jsd", "none"), ("rkl", "none")])
def test_on_policy_run_writes_a_checkpoint_and_logs(tmp_path, student, tiny_teacher, prompts, loss, baseline):
    run_distill(student, tmp_path / "ckpt", prompts, _opts(tmp_path, loss, baseline=baseline), teacher=tiny_teacher)
    steps = _log(tmp_path)
    assert len(steps) == 2 and all(np.isfinite(s["loss"]) and 1 <= s["response_length"] <= 6 for s in steps)
    if loss is None:
        assert all(np.isfinite(s["opd_reward"]) and s["advantage_rms"] > 0 for s in steps)
        assert ("rkl" in steps[0]) == (baseline == "vopd")
        assert all(s["rkl"] >= 0 for s in steps if "rkl" in s)
    else:
        assert loss in steps[0]
    assert (tmp_path / "ckpt" / "model.safetensors").exists() and (tmp_path / "ckpt" / "fdivctl_state").exists()


def _head_gradients(tmp_path, student, teacher, prompts, baseline, n_batches, topk=None):
    model, _, n, loss_fn = prepare_distill(student, prompts, _opts(tmp_path, baseline=baseline, baseline_topk=topk),
                                           teacher=teacher)
    head = model.get_output_embeddings().weight
    grads, spreads = [], []
    for i in range(n_batches):  # step i draws batch i's samples: the same samples for every baseline
        loss, figures = loss_fn([0, 1, 2, 3, 4, 5], step=i, total=n_batches)
        grads.append(torch.autograd.grad(loss, head)[0].flatten().double())
        spreads.append(figures["advantage_rms"])
    return torch.stack(grads), float(np.mean(spreads))


def test_vopd_baseline_keeps_the_expected_gradient_and_lowers_its_variance(tmp_path, student, sharp_teacher, prompts):
    m = 48
    plain, plain_spread = _head_gradients(tmp_path, student, sharp_teacher, prompts, "none", m)
    vopd, vopd_spread = _head_gradients(tmp_path, student, sharp_teacher, prompts, "vopd", m)
    topk, _ = _head_gradients(tmp_path, student, sharp_teacher, prompts, "vopd", m, topk=8)
    # the logged advantage_rms shows it: the baseline takes each state's expected reward out of A_t
    assert vopd_spread < 0.9 * plain_spread, (vopd_spread, plain_spread)  # 1.36 vs 1.63 nats
    for with_baseline in (vopd, topk):
        diff = plain - with_baseline  # = Σ_t KL_t ∇log q(y_t) / N per batch: zero mean
        # the mean difference is within 3 standard errors of zero (its squared norm vs trace of its covariance / m)
        assert float(diff.mean(0).square().sum()) < 9 * float(diff.var(0).sum()) / m
    variance = {name: float(g.var(0).sum()) for name, g in (("none", plain), ("vopd", vopd), ("topk", topk))}
    print("gradient variance (trace) over", m, "batches:", variance)
    assert variance["vopd"] < 0.8 * variance["none"] and variance["topk"] < variance["none"]


@pytest.mark.parametrize("baseline", [False, True])
def test_opd_figures_by_hand(baseline):
    """opd_loss's logged reward, KL and advantage RMS against log q, log p and KL(q‖p) computed directly."""
    from fdivctl import engine
    from fdivctl.objectives.opd import opd_loss

    g = torch.Generator().manual_seed(0)
    n, h, v = 37, 16, 50
    hidden, weight = torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(v, h, generator=g,
                                                                                       dtype=torch.float64)
    teacher = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    ids = torch.randint(0, v, (n,), generator=g)
    log_q, log_p = torch.log_softmax(hidden @ weight.T, -1), torch.log_softmax(teacher, -1)
    reward = (log_p - log_q).gather(-1, ids[:, None]).squeeze(-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    target = engine.FullLogits(teacher) if baseline else None
    _, figures = opd_loss(hidden, weight, None, ids, log_p.gather(-1, ids[:, None]).squeeze(-1), target,
                          chunk_size=8)
    advantage = reward + kl if baseline else reward
    assert figures["opd_reward"] == pytest.approx(float(reward.mean()), rel=1e-9)
    assert figures["advantage_rms"] == pytest.approx(float(advantage.square().mean().sqrt()), rel=1e-9)
    if baseline:
        assert figures["rkl"] == pytest.approx(float(kl.mean()), rel=1e-9)


def test_on_policy_resume_draws_the_same_samples(tmp_path, student, tiny_teacher, prompts):
    common = dict(loop=dict(save_every=1))
    straight = tmp_path / "straight"
    run_distill(student, straight, prompts, _opts(tmp_path, steps=3, baseline="vopd", **common), teacher=tiny_teacher)

    def stop(step, total, figures):
        if step == 2:
            raise KeyboardInterrupt

    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_distill(student, resumed, prompts, _opts(tmp_path, steps=3, baseline="vopd", **common),
                    teacher=tiny_teacher, on_step=stop)
    opts = _opts(tmp_path, steps=3, baseline="vopd", **common)
    opts.loop.resume = True
    run_distill(student, resumed, prompts, opts, teacher=tiny_teacher)
    wa, wb = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=0)


def test_paced_weights_and_depth_schedule_by_hand():
    w = paced_weights(torch.tensor([0.0, 0.25, 0.5, 1.0]))
    torch.testing.assert_close(w, torch.tensor([0.0, 0.75, 1.0, 0.0], dtype=torch.float64))
    w = paced_weights(torch.tensor([0.2]), alpha=2.0, beta=1.0)  # peak at 2/3: (0.04·0.8) / ((4/9)(1/3))
    assert float(w) == pytest.approx(0.032 / (4 / 27))
    assert [exposed_turns(s, 1, 4, 3) for s in range(6)] == [1, 1, 2, 3, 3, 3]  # 1 + ⌊3s/4⌋, then all 3


def test_paced_weights_scale_the_loss(tmp_path, student, tiny_teacher, prompts):
    losses = {}
    for weighting in ("none", "paced"):
        opts = _opts(tmp_path, "rkl", prompt_weighting=weighting)
        _, _, _, loss_fn = prepare_distill(student, prompts, opts, teacher=tiny_teacher)
        losses[weighting] = float(loss_fn([0, 4], step=0)[0].detach())  # pass rates 0 and 1: PACED weight 0
    assert losses["none"] > 0 and losses["paced"] == 0.0
    table = pq.read_table(prompts)
    holed = tmp_path / "holed.parquet"
    pq.write_table(table.set_column(2, "pass_rate", pa.array([0.0, 0.25, None, 0.75, 1.0, 0.5])), holed)
    with pytest.raises(UserError, match="column 'pass_rate' is null in row 2"):
        prepare_distill(student, holed, _opts(tmp_path, "rkl", prompt_weighting="paced"), teacher=tiny_teacher)


def test_depth_curriculum_masks_later_turns(tmp_path, student, tiny_teacher):
    vocab = len(AutoTokenizer.from_pretrained(tiny_teacher))
    g = torch.Generator().manual_seed(0)
    completions = torch.randint(3, vocab, (4, 6), generator=g).tolist()
    turns = [[0, 0, 1, 1, 2, 2]] * 4
    data = tmp_path / "multi.parquet"
    pq.write_table(pa.table({"prompt_id": [f"m{i}" for i in range(4)],
                             "prompt_token_ids": pa.array(torch.randint(3, vocab, (4, 3), generator=g).tolist(),
                                                          pa.list_(pa.int32())),
                             "completion_token_ids": pa.array(completions, pa.list_(pa.int32())),
                             "turn_ids": pa.array(turns, pa.list_(pa.int32()))}), data)
    loop = LoopOptions(lr=1e-3, lr_schedule="constant", batch_size=4, max_steps=1)
    values = []
    for depth in (False, True):
        opts = DistillOptions(loss="fkl", device="cpu", loop=loop, depth_curriculum=depth, depth_start=1,
                              depth_warmup=3)
        _, _, _, loss_fn = prepare_distill(student, data, opts, teacher=tiny_teacher)
        values.append([float(loss_fn([0, 1, 2, 3], step=s, total=6)[0].detach()) for s in (0, 1, 3)])
    full, curriculum = values
    without = data.with_name("plain.parquet")
    pq.write_table(pq.read_table(data).drop(["turn_ids"]), without)
    with pytest.raises(Exception, match="turn_ids"):
        prepare_distill(student, without, opts, teacher=tiny_teacher)
    assert curriculum[0] < curriculum[1] < curriculum[2] == pytest.approx(full[2])  # 1/3, 2/3, then all turns


CHAT_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}### assistant:\n{% endif %}")


def test_turns_from_the_chat_template(tmp_path, student, tiny_teacher):
    """Without turn_ids the depth curriculum counts the template's assistant headers: same loss as explicit ids."""
    assert [t.tolist() for t in turns_from_chat_template([np.array([5, 7, 8, 6, 7, 8, 7]), np.array([7])], [7, 8])] \
        == [[0, 1, 1, 1, 2, 2, 2], [0]]
    chat_student = tmp_path / "chat_student"
    tokenizer = AutoTokenizer.from_pretrained(student)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(chat_student)
    for f in ("config.json", "model.safetensors"):
        (chat_student / f).write_bytes((student / f).read_bytes())
    header = assistant_header(tokenizer)
    assert header == tokenizer.encode("### assistant:\n", add_special_tokens=False)
    g = torch.Generator().manual_seed(2)
    answers = [torch.randint(3, len(tokenizer), (3,), generator=g).tolist() for _ in range(3)]
    completion = answers[0] + header + answers[1] + header + answers[2]
    turns = [0] * 3 + [1] * (len(header) + 3) + [2] * (len(header) + 3)
    table = {"prompt_id": ["c0", "c1"], "prompt_token_ids": pa.array([[5, 6, 7]] * 2, pa.list_(pa.int32())),
             "completion_token_ids": pa.array([completion] * 2, pa.list_(pa.int32()))}
    explicit, derived = tmp_path / "explicit.parquet", tmp_path / "derived.parquet"
    pq.write_table(pa.table({**table, "turn_ids": pa.array([turns] * 2, pa.list_(pa.int32()))}), explicit)
    pq.write_table(pa.table(table), derived)
    opts = DistillOptions(loss="fkl", device="cpu", depth_curriculum=True, depth_start=1, depth_warmup=3,
                          loop=LoopOptions(batch_size=2, max_steps=1))
    losses = []
    for data in (explicit, derived):
        _, _, _, loss_fn = prepare_distill(chat_student, data, opts, teacher=tiny_teacher)
        losses.append([float(loss_fn([0, 1], step=s, total=6)[0].detach()) for s in (0, 1, 3)])
    assert losses[0] == losses[1] and losses[0][0] < losses[0][1] < losses[0][2]


def test_eval_every_logs_a_held_out_loss(tmp_path, student, tiny_teacher, prompts):
    vocab = len(AutoTokenizer.from_pretrained(tiny_teacher))
    g = torch.Generator().manual_seed(1)
    held_out = tmp_path / "held_out.parquet"
    pq.write_table(pa.table({
        "prompt_id": ["h0", "h1"],
        "prompt_token_ids": pa.array(torch.randint(3, vocab, (2, 4), generator=g).tolist(), pa.list_(pa.int32())),
        "completion_token_ids": pa.array(torch.randint(3, vocab, (2, 5), generator=g).tolist(), pa.list_(pa.int32())),
    }), held_out)
    opts = _opts(tmp_path, baseline="vopd", steps=3, eval_data=held_out, loop=dict(eval_every=2))
    run_distill(student, tmp_path / "ckpt", prompts, opts, teacher=tiny_teacher)
    steps = _log(tmp_path)
    assert ["eval_loss" in s for s in steps] == [False, True, True]
    assert steps[1]["eval_tokens"] == 10 and steps[2]["eval_loss"] > 0


@pytest.mark.parametrize("extra,message", [
    (["--on-policy", "--prompts", "{prompts}", "--baseline", "vopd", "--loss", "jsd"], "baseline of --loss opd"),
    (["--data", "{prompts}", "--loss", "opd"], "--on-policy"),
    (["--on-policy", "--prompts", "{prompts}", "--baseline-topk", "4"], "--baseline vopd"),
    (["--on-policy", "--prompts", "{prompts}", "--teacher", "{teacher}"], "one --teacher"),
    (["--on-policy", "--prompts", "{prompts}", "--depth-curriculum"], "offline only"),
    (["--on-policy", "--prompts", "{prompts}", "--eval-every", "1"], "--eval-data"),
    (["--on-policy", "--prompts", "{prompts}", "--loss", "fkl", "--sinkhorn-eps", "0.1"], "--loss sinkhorn"),
    (["--on-policy", "--prompts", "{repeated}", "--loss", "fkl"], "is in rows 0 and 1: every prompt needs its own id"),
])
def test_bad_on_policy_input(tmp_path, student, tiny_teacher, prompts, extra, message):
    table = pq.read_table(prompts)
    repeated = tmp_path / "repeated.parquet"
    pq.write_table(table.set_column(table.column_names.index("prompt_id"), "prompt_id",
                                    pa.array(["same"] * table.num_rows, pa.string())), repeated)
    args = [a.format(prompts=prompts, teacher=tiny_teacher, repeated=repeated) for a in extra]
    done = run_cli("distill", student, tmp_path / "out", "--teacher", tiny_teacher, *args, "--device", "cpu")
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_cli_on_policy_vopd_with_grad_checkpointing_matches_without(tmp_path, student, tiny_teacher, prompts):
    outs = []
    for flag in ("--no-grad-checkpointing", "--grad-checkpointing"):
        out = tmp_path / flag.strip("-")
        done = run_cli("distill", student, out, "--on-policy", "--prompts", prompts, "--teacher", tiny_teacher,
                       "--baseline", "vopd", "--samples-per-prompt", 2, "--max-new-tokens", 5, "--batch-size", 3,
                       "--max-steps", 2, "--lr", 1e-3, "--device", "cpu", flag)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.strip().splitlines()[-1])["steps"] == 2
        outs.append(load_file(out / "model.safetensors"))
    for name in outs[0]:
        torch.testing.assert_close(outs[0][name], outs[1][name], atol=1e-6, rtol=1e-5)
