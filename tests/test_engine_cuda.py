"""The engine on a GPU: bf16 inputs through fp32-output matmuls, against float64 math.

Skipped where no CUDA device is present (CI); run on a lent accelerator.
"""

import pytest
import torch

from fdivctl import engine
from reference import ENTRIES, entry_id, reference_full, reference_topk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("entry", ENTRIES, ids=entry_id)
@pytest.mark.parametrize("grad_mode", ["forward", "recompute"])
@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_bf16_engine_matches_float64_reference(entry, grad_mode, kernel):
    name, params = entry
    from fdivctl import divergences

    g = torch.Generator(device="cuda").manual_seed(0)
    n, h, v = 301, 256, 5003
    hidden = torch.randn(n, h, device="cuda", generator=g, dtype=torch.bfloat16)
    weight = (torch.randn(v, h, device="cuda", generator=g) * h**-0.5).to(torch.bfloat16)
    th = torch.randn(n, h, device="cuda", generator=g, dtype=torch.bfloat16)
    tw = (torch.randn(v, h, device="cuda", generator=g) * h**-0.5).to(torch.bfloat16)
    hl, wl = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = engine.divergence_loss(
        hl, wl, engine.TeacherHead(th, tw), divergences.get(name, **params),
        chunk_size=64, grad_mode=grad_mode, temperature=1.3, kernel=kernel,
    )
    gh, gw = torch.autograd.grad(loss, (hl, wl))
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref = reference_full(name, params, h64 @ w64.T, th.double() @ tw.double().T, temperature=1.3).mean()
    rh, rw = torch.autograd.grad(ref, (h64, w64))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-6)
    # gradients go through bf16 GEMM operands: compare by relative norm error
    for ours, exact in ((gh, rh), (gw, rw)):
        err = (ours.double() - exact).norm() / exact.norm()
        assert err < 1e-2, f"relative gradient error {float(err):.2e}"


@pytest.mark.parametrize("accum", ["fp32", "param"])
def test_gathered_weight_gradient_rows_match_per_chunk_ones(accum):
    """The logit gradients of 4 chunks of 64 rows gathered per weight-gradient GEMM (the fp32 default on CUDA
    here, the Triton kernel writing into the shared bf16 buffer): the same gradients as one GEMM per chunk, up
    to fp32 summation order (and bf16 rounding per GEMM with ``param``)."""
    g = torch.Generator(device="cuda").manual_seed(3)
    n, h, v = 1000, 256, 5003
    hidden = torch.randn(n, h, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(v, h, device="cuda", generator=g) * h**-0.5).to(torch.bfloat16).requires_grad_(True)
    target = engine.TeacherHead(torch.randn(n, h, device="cuda", generator=g, dtype=torch.bfloat16), weight.detach())
    assert engine.default_weight_grad_rows(64, h, hidden.device) == 256
    grads: dict = {}
    for rows in (256, 1):
        loss = engine.divergence_loss(hidden, weight, target, "jsd", chunk_size=64, weight_grad_accum=accum,
                                      weight_grad_rows=rows)
        grads[rows] = torch.autograd.grad(loss, (hidden, weight))
    for gathered, per_chunk in zip(grads[256], grads[1]):
        err = (gathered.double() - per_chunk.double()).norm() / per_chunk.double().norm()
        assert err < (1e-3 if accum == "fp32" else 2e-2), f"relative difference {float(err):.2e}"


def test_bf16_weight_grad_accumulation_stays_close_to_float64():
    """``weight_grad_accum="param"`` (bf16 accumulator, one rounding per chunk) over 32 chunks."""
    g = torch.Generator(device="cuda").manual_seed(2)
    n, h, v = 2048, 256, 5003
    hidden = torch.randn(n, h, device="cuda", generator=g, dtype=torch.bfloat16)
    weight = (torch.randn(v, h, device="cuda", generator=g) * h**-0.5).to(torch.bfloat16).requires_grad_(True)
    th = torch.randn(n, h, device="cuda", generator=g, dtype=torch.bfloat16)
    tw = (torch.randn(v, h, device="cuda", generator=g) * h**-0.5).to(torch.bfloat16)
    loss = engine.divergence_loss(hidden, weight, engine.TeacherHead(th, tw), "jsd", chunk_size=64,
                                  weight_grad_accum="param")
    (gw,) = torch.autograd.grad(loss, weight)
    w64 = weight.detach().double().requires_grad_(True)
    ref = reference_full("jsd", {"beta": 0.5}, hidden.double() @ w64.T, th.double() @ tw.double().T).mean()
    (rw,) = torch.autograd.grad(ref, w64)
    assert gw.dtype == torch.bfloat16
    assert (gw.double() - rw).norm() / rw.norm() < 2e-2


@pytest.mark.parametrize("k", [16, 256])
def test_triton_head_topk_matches_the_torch_path(k):
    from fdivctl.engine.topk import head_topk

    g = torch.Generator(device="cuda").manual_seed(3)
    n, h, v = 1500, 256, 151936
    hidden = torch.randn(n, h, device="cuda", generator=g, dtype=torch.bfloat16)
    weight = (torch.randn(v, h, device="cuda", generator=g) * h**-0.5 * 3).to(torch.bfloat16)
    tokens = torch.randint(0, v, (n,), device="cuda", generator=g)
    got = head_topk(hidden, weight, k, tokens, temperature=0.8, kernel="triton", chunk_size=512)
    ref = head_topk(hidden, weight, k, tokens, temperature=0.8, kernel="torch", chunk_size=512)
    for a, b in zip(got, ref):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    from fdivctl.engine.matmul import linear_fp32

    # bf16 logits tie now and then: compare the chosen ids by their logits (made in the same chunks)
    logits = torch.cat([linear_fp32(hidden[i : i + 512], weight) for i in range(0, n, 512)])
    assert torch.equal(logits.gather(-1, got.ids.long()), logits.gather(-1, ref.ids.long()))


def test_fp32_output_matmul_is_used_for_bf16():
    from fdivctl.engine.matmul import native_fp32_output

    assert native_fp32_output("cuda", torch.bfloat16)


def test_auto_kernel_is_triton_on_cuda():
    from fdivctl.engine.sweep import resolve_kernel

    hidden = torch.zeros(2, 2, device="cuda")
    assert resolve_kernel("auto", hidden, None) == "triton"


@pytest.mark.parametrize("tail", ["tail", "renormalize", "ignore"])
@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_bf16_topk_target_matches_float64_reference(tail, kernel):
    """Offline distillation's target, a logit store's top 64 of a 5003-id teacher, against float64 math."""
    g = torch.Generator(device="cuda").manual_seed(2)
    n, h, v = 301, 256, 5003
    hidden = torch.randn(n, h, device="cuda", generator=g, dtype=torch.bfloat16)
    weight = (torch.randn(v, h, device="cuda", generator=g) * h**-0.5).to(torch.bfloat16)
    log_p = torch.log_softmax(torch.randn(n, v, device="cuda", generator=g) * 3, -1)
    logprobs, ids = log_p.topk(64, -1)
    log_tail = torch.logsumexp(log_p.scatter(-1, ids, float("-inf")), -1)
    hl, wl = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = engine.divergence_loss(hl, wl, engine.TopK(ids.int(), logprobs, log_tail, temperature=1.3, tail=tail), "jsd",
                                  chunk_size=64, temperature=1.3, kernel=kernel)
    gh, gw = torch.autograd.grad(loss, (hl, wl))
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref = reference_topk("jsd", {}, h64 @ w64.T, ids, logprobs, log_tail, tail, temperature=1.3).mean()
    rh, rw = torch.autograd.grad(ref, (h64, w64))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-6)
    for ours, exact in ((gh, rh), (gw, rw)):
        err = (ours.double() - exact).norm() / exact.norm()
        assert err < 1e-2, f"relative gradient error {float(err):.2e}"


@pytest.mark.parametrize("weights", ["confidence", [0.25, 0.75]])
def test_teacher_mixture_on_triton_matches_the_torch_path(weights):
    """Two bf16 teacher heads mixed per token (one padded to a larger head): the mixture's log-probabilities read
    by the compiled dense kernels give the PyTorch path's jsd loss and gradients on the same GPU."""
    g = torch.Generator(device="cuda").manual_seed(4)
    n, h, v = 301, 256, 5003
    hidden = torch.randn(n, h, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(v, h, device="cuda", generator=g) * h**-0.5).to(torch.bfloat16).requires_grad_(True)
    teachers = [engine.TeacherHead(torch.randn(n, h, device="cuda", generator=g, dtype=torch.bfloat16),
                                   (torch.randn(t_vocab, h, device="cuda", generator=g) * 2 * h**-0.5).to(torch.bfloat16),
                                   vocab="strict" if t_vocab == v else "truncate")
                for t_vocab in (v, v + 61)]
    results = {}
    for kernel in ("torch", "triton"):
        loss = engine.divergence_loss(hidden, weight, engine.TeacherMixture(teachers, weights), "jsd",
                                      chunk_size=64, temperature=1.3, kernel=kernel)
        results[kernel] = (loss, *torch.autograd.grad(loss, (hidden, weight)))
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    for ours, ref in zip(results["triton"][1:], results["torch"][1:]):
        err = (ours.double() - ref.double()).norm() / ref.double().norm()
        assert err < 1e-2, f"relative gradient error {float(err):.2e}"


@pytest.mark.parametrize("target", ["full", "topk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_token_loss_matches_the_torch_path(dtype, target):
    """The RL policy loss (clipped surrogate − entropy + rkl to full reference logits, or to a top-64 store of
    them) through the compiled kernels equals the PyTorch path on the same GPU."""
    from fdivctl.objectives import grpo

    g = torch.Generator(device="cuda").manual_seed(1)
    n, h, v = 517, 128, 9001
    hidden = torch.randn(n, h, device="cuda", generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, device="cuda", generator=g) * h**-0.5).to(dtype).requires_grad_(True)
    tokens = torch.randint(0, v, (n,), device="cuda", generator=g)
    old = -torch.rand(n, device="cuda", generator=g) * 4
    adv = torch.randn(n, device="cuda", generator=g)
    ref_logits = torch.randn(n, v, device="cuda", generator=g).to(dtype)

    def objective(out, rows):
        loss, _ = grpo.clipped_surrogate(out["logprob"], old[rows], adv[rows], 0.2, 0.28)
        return (loss - 0.01 * out["entropy"] + 0.1 * out["divergence"]).sum()

    if target == "full":
        ref_target = engine.FullLogits(ref_logits)
    else:
        log_p = torch.log_softmax(ref_logits.float(), -1)
        logprobs, ids = log_p.topk(64, -1)
        ref_target = engine.TopK(ids.int(), logprobs, torch.logsumexp(log_p.scatter(-1, ids, float("-inf")), -1))
    results = {}
    for kernel in ("torch", "triton"):
        total, outputs = engine.token_loss(
            hidden, weight, objective, token_ids=tokens, entropy=True, target=ref_target,
            divergence="rkl", chunk_size=128, kernel=kernel,
        )
        results[kernel] = (total, outputs.logprob, outputs.entropy, *torch.autograd.grad(total, (hidden, weight)))
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    for ours, ref in zip(results["triton"][:3], results["torch"][:3]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for ours, ref in zip(results["triton"][3:], results["torch"][3:]):
        torch.testing.assert_close(ours.float(), ref.float(), **tol)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_soft_capped_bf16_heads_match_float64_reference(kernel):
    """softcap on the GPU: the student's capped bf16 logits (the cap's slope multiplied into the bf16 gradient rows
    the Triton kernel wrote) and a capped teacher, against autograd through capped float64 logits."""
    g = torch.Generator(device="cuda").manual_seed(5)
    n, h, v, cap = 700, 256, 5003, 2.0
    hidden = torch.randn(n, h, device="cuda", generator=g, dtype=torch.bfloat16)
    weight = (torch.randn(v, h, device="cuda", generator=g) * 4 * h**-0.5).to(torch.bfloat16)
    th = torch.randn(n, h, device="cuda", generator=g, dtype=torch.bfloat16)
    tw = (torch.randn(v, h, device="cuda", generator=g) * 4 * h**-0.5).to(torch.bfloat16)
    hl, wl = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = engine.divergence_loss(hl, wl, engine.TeacherHead(th, tw, softcap=cap), "jsd", chunk_size=64,
                                  kernel=kernel, softcap=cap)
    gh, gw = torch.autograd.grad(loss, (hl, wl))
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    capped = lambda u: cap * torch.tanh(u / cap)  # noqa: E731
    ref = reference_full("jsd", {}, capped(h64 @ w64.T), capped(th.double() @ tw.double().T)).mean()
    rh, rw = torch.autograd.grad(ref, (h64, w64))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-6)
    for ours, exact in ((gh, rh), (gw, rw)):
        err = (ours.double() - exact).norm() / exact.norm()
        assert err < 1e-2, f"relative gradient error {float(err):.2e}"
