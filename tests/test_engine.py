"""The chunked loss engine against the unchunked PyTorch / float64 references."""

import pytest
import torch

from fdivctl import divergences, engine
from reference import ENTRIES, entry_id, reference_full, reference_topk

N, H, V = 29, 12, 40


def _tensors(dtype=torch.float64, seed=0, n=N, h=H, v=V, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    b = (torch.randn(v, generator=g, dtype=torch.float64) * 0.3).to(dtype) if bias else None
    t_hidden = torch.randn(n, h + 3, generator=g, dtype=torch.float64).to(dtype)
    t_weight = (torch.randn(v, h + 3, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    return hidden, weight, b, t_hidden, t_weight


def _topk(teacher_logits, k, temperature=1.0):
    log_p = torch.log_softmax(teacher_logits.double() / temperature, -1)
    lp, ids = log_p.topk(k, -1)
    log_tail = torch.log1p(-lp.exp().sum(-1).clamp(max=1.0))
    return ids.to(torch.int32), lp, log_tail


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


def _leaf(t):
    return None if t is None else t.clone().requires_grad_(True)


@pytest.mark.parametrize("entry", ENTRIES, ids=entry_id)
@pytest.mark.parametrize("kind", ["full", "head"])
@pytest.mark.parametrize("grad_mode", ["forward", "recompute"])
def test_dense_targets_match_unchunked_reference(entry, kind, grad_mode):
    name, params = entry
    hidden, weight, bias, th, tw = _tensors(bias=True)
    mask = torch.ones(N, dtype=torch.bool)
    mask[[0, 5, 6, 28]] = False
    weights = torch.rand(N, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.1
    h, w, b = _leaf(hidden), _leaf(weight), _leaf(bias)
    target = engine.FullLogits(th @ tw.T) if kind == "full" else engine.TeacherHead(th, tw)
    ours = engine.divergence_loss(
        h, w, target, divergences.get(name, **params), bias=b, mask=mask, weights=weights,
        temperature=1.7, chunk_size=5, grad_mode=grad_mode,
    )
    h2, w2, b2 = _leaf(hidden), _leaf(weight), _leaf(bias)
    per_token = reference_full(name, params, h2 @ w2.T + b2, th @ tw.T, temperature=1.7)
    cw = weights * mask
    ref = (per_token * cw).sum() / cw.sum()
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    for g_ours, g_ref in zip(_grads(ours, h, w, b), _grads(ref, h2, w2, b2)):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("entry", ENTRIES, ids=entry_id)
@pytest.mark.parametrize("tail", ["tail", "renormalize", "ignore"])
def test_topk_target_matches_bucket_reference(entry, tail):
    name, params = entry
    hidden, weight, _, th, tw = _tensors(seed=1)
    ids, lp, log_tail = _topk(th @ tw.T, k=7)
    h, w = _leaf(hidden), _leaf(weight)
    ours = engine.divergence_loss(
        h, w, engine.TopK(ids, lp, log_tail, tail=tail), divergences.get(name, **params), chunk_size=4
    )
    h2, w2 = _leaf(hidden), _leaf(weight)
    ref = reference_topk(name, params, h2 @ w2.T, ids, lp, log_tail, tail).mean()
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    for g_ours, g_ref in zip(_grads(ours, h, w), _grads(ref, h2, w2)):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("entry", ENTRIES, ids=entry_id)
def test_full_k_store_equals_full_logits_even_when_re_tempered(entry):
    """k = V leaves an empty tail: the sparse form is the full form; re-tempering is exact."""
    name, params = entry
    hidden, weight, _, th, tw = _tensors(seed=2)
    teacher = th @ tw.T
    ids, lp, log_tail = _topk(teacher, k=V, temperature=2.0)
    d = divergences.get(name, **params)
    sparse = engine.divergence_loss(hidden, weight, engine.TopK(ids, lp, log_tail, temperature=2.0), d, temperature=0.8)
    dense = engine.divergence_loss(hidden, weight, engine.FullLogits(teacher), d, temperature=0.8)
    torch.testing.assert_close(sparse, dense, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, N, 1000])
def test_token_outputs_match_reference_for_any_chunking(chunk_size):
    hidden, weight, bias, th, tw = _tensors(seed=4, bias=True)
    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(5))
    h, w, b = _leaf(hidden), _leaf(weight), _leaf(bias)
    out = engine.token_outputs(
        h, w, bias=b, token_ids=ids, entropy=True, target=engine.TeacherHead(th, tw),
        divergence="jsd", temperature=0.9, chunk_size=chunk_size,
    )
    h2, w2, b2 = _leaf(hidden), _leaf(weight), _leaf(bias)
    logits = (h2 @ w2.T + b2) / 0.9
    log_q = torch.log_softmax(logits, -1)
    ref_lp = log_q.gather(-1, ids[:, None]).squeeze(-1)
    ref_ent = -(log_q.exp() * log_q).sum(-1)
    ref_div = reference_full("jsd", {}, h2 @ w2.T + b2, th @ tw.T, temperature=0.9)
    for ours, ref in ((out.logprob, ref_lp), (out.entropy, ref_ent), (out.divergence, ref_div)):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    # an arbitrary use of all three outputs, as an RL objective would make
    gen = torch.Generator().manual_seed(6)
    a, c, e = (torch.randn(N, generator=gen, dtype=torch.float64) for _ in range(3))
    ours = (a * out.logprob.exp() + c * out.entropy + e * out.divergence).sum()
    ref = (a * ref_lp.exp() + c * ref_ent + e * ref_div).sum()
    for g_ours, g_ref in zip(_grads(ours, h, w, b), _grads(ref, h2, w2, b2)):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-11)


def test_token_outputs_unused_output_gets_no_gradient_work():
    hidden, weight, *_ = _tensors(seed=7)
    h, w = _leaf(hidden), _leaf(weight)
    out = engine.token_outputs(h, w, token_ids=torch.zeros(N, dtype=torch.long), entropy=True)
    (g,) = torch.autograd.grad(out.logprob.sum(), h)
    log_q = torch.log_softmax(hidden @ weight.T, -1)
    expected = (torch.nn.functional.one_hot(torch.zeros(N, dtype=torch.long), V) - log_q.exp()) @ weight
    torch.testing.assert_close(g, expected)


def test_fully_masked_batch_gives_zero_loss_and_zero_grads():
    hidden, weight, _, th, tw = _tensors(seed=8)
    h, w = _leaf(hidden), _leaf(weight)
    loss = engine.divergence_loss(h, w, engine.TeacherHead(th, tw), "fkl", mask=torch.zeros(N, dtype=torch.bool))
    assert float(loss.detach()) == 0.0
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert gh.abs().max() == 0 and gw.abs().max() == 0


def test_masked_rows_get_zero_hidden_gradient():
    hidden, weight, _, th, tw = _tensors(seed=9)
    mask = torch.arange(N) % 3 == 0
    h = _leaf(hidden)
    loss = engine.divergence_loss(h, weight, engine.FullLogits(th @ tw.T), "rkl", mask=mask, chunk_size=2)
    (gh,) = torch.autograd.grad(loss, h)
    assert gh[~mask].abs().max() == 0 and gh[mask].abs().max() > 0


@pytest.mark.parametrize("grad_mode", ["forward", "recompute"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_on_cpu_match_fp32_math(grad_mode, dtype):
    hidden, weight, _, th, tw = _tensors(dtype=dtype, seed=10, n=33, h=32, v=64)
    h, w = _leaf(hidden), _leaf(weight)
    loss = engine.divergence_loss(h, w, engine.TeacherHead(th, tw), "jsd", chunk_size=8, grad_mode=grad_mode)
    assert loss.dtype == torch.float32
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert gh.dtype == dtype and gw.dtype == dtype
    # reference: the same low-precision numbers, all math in float64
    h2, w2 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref = reference_full("jsd", {}, h2 @ w2.T, th.double() @ tw.double().T).mean()
    rh, rw = torch.autograd.grad(ref, (h2, w2))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh.double(), rh, rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(gw.double(), rw, rtol=2e-2, atol=1e-4)


def test_no_grad_inputs_and_inference_mode():
    hidden, weight, _, th, tw = _tensors(seed=11)
    with torch.no_grad():
        loss = engine.divergence_loss(hidden, weight, engine.TeacherHead(th, tw), "tv")
    ref = reference_full("tv", {}, hidden @ weight.T, th @ tw.T).mean()
    torch.testing.assert_close(loss, ref)


def test_vocab_policies():
    hidden, weight, _, th, _ = _tensors(seed=12)
    g = torch.Generator().manual_seed(13)
    padded_head = torch.randn(V + 24, H + 3, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="vocabulary size 64 but the student head has 40"):
        engine.divergence_loss(hidden, weight, engine.TeacherHead(th, padded_head), "fkl")
    truncated = engine.divergence_loss(hidden, weight, engine.TeacherHead(th, padded_head, vocab="truncate"), "fkl")
    direct = engine.divergence_loss(hidden, weight, engine.FullLogits(th @ padded_head[:V].T), "fkl")
    torch.testing.assert_close(truncated, direct)
    small = th @ padded_head[: V - 4].T
    padded = engine.divergence_loss(hidden, weight, engine.FullLogits(small, vocab="pad"), "rkl")
    by_hand = engine.FullLogits(torch.cat((small, torch.full((N, 4), float("-inf"), dtype=small.dtype)), -1))
    torch.testing.assert_close(padded, engine.divergence_loss(hidden, weight, by_hand, "rkl"))
    assert torch.isfinite(padded)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t: dict(hidden=t["h"][:, :5]), r"disagree on H"),
        (lambda t: dict(hidden=t["h"].float()), r"must be one floating dtype"),
        (lambda t: dict(hidden=t["h"][0]), r"hidden must be \[N, H\]"),
        (lambda t: dict(target=engine.FullLogits(t["tl"][:, :7])), r"vocabulary size 7 but the student head has 40"),
        (lambda t: dict(target=engine.FullLogits(t["tl"][:10])), r"target logits have shape \(10, 40\); expected \[29, V\]"),
        (lambda t: dict(target=engine.TopK(torch.zeros(N, 41, dtype=torch.int32), torch.zeros(N, 41, dtype=torch.float64), torch.zeros(N, dtype=torch.float64))), r"k=41 exceeds the student vocabulary size 40"),
        (lambda t: dict(target=engine.TopK(torch.full((N, 3), 40, dtype=torch.int32), torch.zeros(N, 3, dtype=torch.float64), torch.zeros(N, dtype=torch.float64))), r"top-k ids out of range"),
        (lambda t: dict(target=engine.TopK(torch.zeros(N, 3), torch.zeros(N, 3), torch.zeros(N))), r"must be int32 or int64"),
        (lambda t: dict(target=engine.TopK(torch.tensor([[0, 1, 2]] * (N - 1) + [[5, 2, 5]], dtype=torch.int32), torch.zeros(N, 3, dtype=torch.float64), torch.zeros(N, dtype=torch.float64))), r"repeat an id within a row \(row 28\)"),
        (lambda t: dict(target=engine.FullLogits(t["tl"].index_fill(0, torch.tensor([3]), float("nan")))), r"target logits \(29, 40\) contains NaN"),
        (lambda t: dict(hidden=t["h"].index_fill(0, torch.tensor([3]), float("nan"))), r"hidden \(29, 12\) contains NaN or inf"),
        (lambda t: dict(mask=torch.ones(N - 1, dtype=torch.bool)), r"mask has shape \(28,\); expected \[29\]"),
        (lambda t: dict(weights=torch.full((N,), float("nan"), dtype=torch.float64)), r"weights \(29,\) contain NaN"),
        (lambda t: dict(temperature=0.0), r"temperature must be > 0"),
        (lambda t: dict(grad_mode="sideways"), r"grad_mode='sideways'; valid: forward, recompute"),
        (lambda t: dict(divergence="kld"), r"unknown divergence 'kld'"),
        (lambda t: dict(target=th_object()), r"target must be a FullLogits, TeacherHead, TeacherMixture or TopK"),
    ],
)
def test_bad_input_is_a_clear_value_error(make, message):
    hidden, weight, _, th, tw = _tensors(seed=14)
    tensors = {"h": hidden, "tl": th @ tw.T}
    kwargs = dict(hidden=hidden, weight=weight, target=engine.FullLogits(th @ tw.T), divergence="fkl")
    kwargs.update(make(tensors))
    with pytest.raises(ValueError, match=message):
        engine.divergence_loss(
            kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("target"), kwargs.pop("divergence"), **kwargs
        )


def th_object():
    return torch.zeros(N, V)


def test_token_ids_are_checked():
    hidden, weight, *_ = _tensors(seed=15)
    with pytest.raises(ValueError, match=r"token_ids out of range \[0, 40\)"):
        engine.token_outputs(hidden, weight, token_ids=torch.full((N,), 40))
    with pytest.raises(ValueError, match="request token_ids"):
        engine.token_outputs(hidden, weight)


def test_default_chunk_size_bounds_the_chunk_buffer():
    assert engine.default_chunk_size(100_000, 32768, torch.device("cpu")) == 128
    assert engine.default_chunk_size(5, 32768, torch.device("cpu")) == 5
    assert engine.default_chunk_size(100_000, 151936, torch.device("cuda")) == 384  # 441, down to whole 128-row tiles


def test_default_weight_grad_rows_gathers_about_the_hidden_size_on_cuda():
    assert engine.default_weight_grad_rows(384, 4096, torch.device("cuda")) == 3840
    assert engine.default_weight_grad_rows(384, 256, torch.device("cuda")) == 384
    assert engine.default_weight_grad_rows(128, 4096, torch.device("cpu")) == 128
    # the bf16 accumulator's buffer is held to a quarter of it: G ≈ H/4 in whole chunks
    assert engine.default_weight_grad_rows(384, 4096, torch.device("cuda"), "param") == 768
    assert engine.default_weight_grad_rows(384, 2048, torch.device("cuda"), "param") == 384
    assert engine.default_weight_grad_rows(384, 4096, torch.device("cpu"), "param") == 384


@pytest.mark.parametrize("rows", [1, 8, 11, N, 1000])
@pytest.mark.parametrize("grad_mode", ["forward", "recompute"])
def test_weight_grad_rows_change_no_gradient(rows, grad_mode):
    """Logit gradients of several chunks gathered for one weight-gradient GEMM (``weight_grad_rows``: fewer,
    larger GEMMs into the [V, H] accumulator) give the reference gradients, whatever the rows (1: each chunk's
    own; 8 and 11 over chunks of 4: flushed whole or part full; more rows than tokens)."""
    hidden, weight, bias, th, tw = _tensors(seed=21, bias=True)
    h, w, b = _leaf(hidden), _leaf(weight), _leaf(bias)
    ours = engine.divergence_loss(h, w, engine.TeacherHead(th, tw), "jsd", bias=b, chunk_size=4, grad_mode=grad_mode,
                                  weight_grad_rows=rows)
    h2, w2, b2 = _leaf(hidden), _leaf(weight), _leaf(bias)
    ref = reference_full("jsd", {}, h2 @ w2.T + b2, th @ tw.T).mean()
    for g_ours, g_ref in zip(_grads(ours, h, w, b), _grads(ref, h2, w2, b2)):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="weight_grad_rows must be ≥ 1"):
        engine.divergence_loss(h, w, engine.TeacherHead(th, tw), "jsd", weight_grad_rows=0)


@pytest.mark.parametrize("weights", [[0.7, 0.3], [2.0, 0.0, 1.0], "confidence"])
def test_teacher_mixture_matches_an_explicit_mixture(weights):
    hidden, weight, _, th, tw = _tensors(seed=16)
    g = torch.Generator().manual_seed(17)
    n_teachers = 3 if len(weights) == 3 else 2
    heads = [(th, tw)] + [(th, torch.randn(V, H + 3, generator=g, dtype=torch.float64)) for _ in range(n_teachers - 1)]
    target = engine.TeacherMixture([engine.TeacherHead(h_, w_) for h_, w_ in heads], weights)
    h, w = _leaf(hidden), _leaf(weight)
    ours = engine.divergence_loss(h, w, target, "jsd", temperature=1.3, chunk_size=6)
    probs = torch.stack([torch.softmax(h_ @ w_.T / 1.3, -1) for h_, w_ in heads])  # [T, N, V]
    if weights == "confidence":
        mix_w = probs.amax(-1, keepdim=True)
        mix_w = mix_w / mix_w.sum(0, keepdim=True)
    else:
        mix_w = torch.tensor(weights, dtype=torch.float64).view(-1, 1, 1) / sum(weights)
    p = (mix_w * probs).sum(0)
    h2, w2 = _leaf(hidden), _leaf(weight)
    log_q = torch.log_softmax(h2 @ w2.T / 1.3, -1)
    from reference import reference_divergence

    ref = reference_divergence("jsd", {}, log_q, p.log()).mean()
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    for g_ours, g_ref in zip(_grads(ours, h, w), _grads(ref, h2, w2)):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-8, atol=1e-11)


def test_teacher_mixture_rejects_bad_weights():
    hidden, weight, _, th, tw = _tensors(seed=18)
    for weights in ([1.0], [float("inf"), 1.0], [float("nan"), 1.0], [-1.0, 2.0], [0.0, 0.0]):
        with pytest.raises(ValueError, match="must be 2 finite non-negative numbers"):
            engine.TeacherMixture([engine.TeacherHead(th, tw)] * 2, weights)
    with pytest.raises(ValueError, match="valid: a list of numbers or 'confidence'"):
        engine.TeacherMixture([engine.TeacherHead(th, tw)], "entropy")


@pytest.mark.parametrize("with_target", [False, True])
def test_token_loss_matches_autograd_through_token_outputs(with_target):
    """A nonlinear per-token objective (the clipped surrogate + KL + entropy) gives the same value and gradients
    from the forward-mode token_loss as from autograd through token_outputs, across chunk boundaries."""
    from fdivctl.objectives import grpo

    g = torch.Generator().manual_seed(7)
    n, h, v = 23, 16, 41
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) / 4).requires_grad_(True)
    bias = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, v, (n,), generator=g)
    old = -torch.rand(n, generator=g, dtype=torch.float64) * 4
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    target = engine.FullLogits(torch.randn(n, v, generator=g, dtype=torch.float64)) if with_target else None
    div = "rkl" if with_target else None

    def per_token(logprob, entropy, divergence, rows):
        loss, _ = grpo.clipped_surrogate(logprob, old[rows], adv[rows], 0.2, 0.28)
        loss = loss - 0.01 * entropy
        return loss + 0.1 * divergence if divergence is not None else loss

    total, outputs = engine.token_loss(
        hidden, weight, lambda c, rows: per_token(c["logprob"], c["entropy"], c.get("divergence"), rows).sum(),
        bias=bias, token_ids=tokens, entropy=True, target=target, divergence=div, temperature=1.3, chunk_size=5)
    (total * 0.7).backward()
    got = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    ref = engine.token_outputs(hidden, weight, bias=bias, token_ids=tokens, entropy=True, target=target,
                               divergence=div, temperature=1.3, chunk_size=5)
    expected = per_token(ref.logprob, ref.entropy, ref.divergence, slice(None)).sum()
    (expected * 0.7).backward()
    assert torch.allclose(total, expected, rtol=1e-12)
    assert torch.allclose(outputs.logprob, ref.logprob.detach()) and outputs.logprob.requires_grad is False
    for a, b in zip(got, (hidden.grad, weight.grad, bias.grad)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_finiteness_checks_allocate_nothing_on_clean_inputs_and_are_exact_on_bad_ones():
    from fdivctl.engine.finite import all_finite, has_nan

    x = torch.randn(300, 7)
    assert all_finite(x) and not has_nan(x)
    y = x.clone()
    y[257, 3] = float("nan")
    assert not all_finite(y) and has_nan(y)
    y = x.clone()
    y[5, 3], y[9, 1] = float("inf"), -float("inf")  # their sum is NaN, yet no element is
    assert not all_finite(y) and not has_nan(y)
    assert all_finite(torch.full((10,), 3e38))  # the sum overflows; every element is finite
    assert all_finite(torch.empty(0, 4)) and not has_nan(torch.empty(0))


def test_weight_grad_accum_choices():
    hidden, weight, _, th, tw = _tensors(torch.float32)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    grads = {}
    for accum in ("fp32", "param"):  # the CPU reads the weight in fp32: both accumulate in fp32
        loss = engine.divergence_loss(hidden, weight, engine.TeacherHead(th, tw), "fkl", weight_grad_accum=accum)
        grads[accum] = torch.autograd.grad(loss, weight)[0]
    assert torch.equal(grads["fp32"], grads["param"])
    with pytest.raises(ValueError, match="weight_grad_accum='bf16'; valid: fp32, param"):
        engine.divergence_loss(hidden, weight, engine.TeacherHead(th, tw), "fkl", weight_grad_accum="bf16")


@pytest.mark.parametrize("k", [1, 5, V - 2, V])  # V - 2: the rest is the two −inf ids
@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_head_topk_matches_a_float64_log_softmax_even_for_a_vanishing_tail(k, temperature):
    """The logit store's summary (engine.topk.head_topk): top-k log-probs, the scored token's log-prob and
    log(1 − Σ top-k p) equal float64 references, also for a row whose tail is e^-300 below its top (the tail is
    summed relative to its own largest term, so it does not underflow to −inf) and for −inf biases. Row 0's logits
    reach ~480, where one fp32 step is ~3e-5: its tolerance is wider."""
    from fdivctl.engine.topk import head_topk

    hidden, weight, _, _, _ = _tensors(torch.float32, seed=k)
    weight[:3, 0] += 120.0  # row 0: ids 0-2 tower over the rest by ~120/T nats (e^-120 is 0 in fp32)
    hidden[:, 0] = 0.0  # ... and only row 0 reads that column
    hidden[0, 0] = 1.0
    bias = torch.zeros(V)
    bias[-2:] = float("-inf")  # two ids no row can emit
    tokens = torch.arange(N) % (V - 2)
    got = head_topk(hidden, weight, k, tokens, bias=bias, temperature=temperature, chunk_size=7)
    logits = (hidden.double() @ weight.double().T + bias.double()) / temperature
    log_p = torch.log_softmax(logits, -1)
    top, ids = log_p.topk(k, -1)
    token_logp = log_p.gather(-1, tokens[:, None]).squeeze(-1)
    for rows, atol in ((slice(1, None), 2e-5), (slice(0, 1), 2e-4)):
        torch.testing.assert_close(got.logprobs[rows].double(), top[rows], rtol=0, atol=atol)
        torch.testing.assert_close(got.token_logprob[rows].double(), token_logp[rows], rtol=0, atol=atol)
    rest = log_p.scatter(-1, ids, float("-inf"))
    if k >= V - 2:
        assert torch.isneginf(got.log_tail).all()
    else:
        torch.testing.assert_close(got.log_tail.double(), torch.logsumexp(rest, -1), rtol=1e-5, atol=2e-4)
        assert torch.isfinite(got.log_tail).all() and (k < 3 or got.log_tail[0] < -110)


def _capped(logits, cap):
    return cap * torch.tanh(logits / cap)


@pytest.mark.parametrize("grad_mode", ["forward", "recompute"])
def test_soft_capped_heads_match_a_capped_float64_reference(grad_mode):
    """softcap=c makes the student's logits c·tanh(u/c) (Gemma 2's final_logit_softcapping) and TeacherHead(softcap)
    the teacher's: values and gradients equal autograd through the capped full logits, with logits of ±10 against
    a cap of 3 so the cap changes them (before: a soft-capped model trained on its uncapped head)."""
    hidden, weight, bias, th, tw = _tensors(bias=True, seed=11)
    weight, tw = weight * 4, tw * 4
    cap_s, cap_t = 3.0, 5.0
    mask = torch.ones(N, dtype=torch.bool)
    mask[[2, 9]] = False
    h, w, b = _leaf(hidden), _leaf(weight), _leaf(bias)
    ours = engine.divergence_loss(h, w, engine.TeacherHead(th, tw, softcap=cap_t), "jsd", bias=b, mask=mask,
                                  temperature=1.3, chunk_size=4, grad_mode=grad_mode, softcap=cap_s)
    h2, w2, b2 = _leaf(hidden), _leaf(weight), _leaf(bias)
    student = _capped(h2 @ w2.T + b2, cap_s)
    ref = reference_full("jsd", {}, student, _capped(th @ tw.T, cap_t), temperature=1.3)[mask].mean()
    uncapped = reference_full("jsd", {}, h2 @ w2.T + b2, th @ tw.T, temperature=1.3)[mask].mean()
    assert abs(uncapped.item() - ref.item()) > 0.05
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    for g_ours, g_ref in zip(_grads(ours, h, w, b), _grads(ref, h2, w2, b2)):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-11)

    ids = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(12))
    h, w, b = _leaf(hidden), _leaf(weight), _leaf(bias)
    out = engine.token_outputs(h, w, bias=b, token_ids=ids, entropy=True, temperature=0.8, chunk_size=6,
                               softcap=cap_s)
    log_q = torch.log_softmax(_capped(h2 @ w2.T + b2, cap_s) / 0.8, -1)
    ref_lp, ref_ent = log_q.gather(-1, ids[:, None]).squeeze(-1), -(log_q.exp() * log_q).sum(-1)
    torch.testing.assert_close(out.logprob, ref_lp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.entropy, ref_ent, rtol=1e-10, atol=1e-12)
    for g_ours, g_ref in zip(_grads((out.logprob + out.entropy).sum(), h, w, b),
                             _grads((ref_lp + ref_ent).sum(), h2, w2, b2)):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="softcap must be a positive number"):
        engine.token_outputs(h, w, token_ids=ids, softcap=0.0)


def test_head_topk_soft_caps_before_the_temperature():
    from fdivctl.engine.topk import head_topk

    hidden, weight, _, _, _ = _tensors(torch.float32, seed=13)
    weight = weight * 4
    tokens = torch.arange(N) % V
    got = head_topk(hidden, weight, 5, tokens, temperature=0.7, chunk_size=8, softcap=3.0)
    log_p = torch.log_softmax(_capped(hidden.double() @ weight.double().T, 3.0) / 0.7, -1)
    top, ids = log_p.topk(5, -1)
    torch.testing.assert_close(got.logprobs.double(), top, rtol=0, atol=2e-5)
    torch.testing.assert_close(got.token_logprob.double(), log_p.gather(-1, tokens[:, None]).squeeze(-1), rtol=0,
                               atol=2e-5)
    torch.testing.assert_close(got.log_tail.double(), torch.logsumexp(log_p.scatter(-1, ids, float("-inf")), -1),
                               rtol=1e-5, atol=2e-5)
