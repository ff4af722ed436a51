"""The Triton chunk kernels on the CPU, under Triton's interpreter, against the float64 references.

The same kernel source runs compiled on CUDA (tests/test_engine_cuda.py runs it
there against float64 math); here ``TRITON_INTERPRET=1`` executes it with numpy,
so CI checks every registry divergence, the dense target kinds and top-k stores,
temperature, vocabulary padding/truncation and the RL outputs without a GPU.

Triton reads the interpreter switch when it is imported, so the cases run in a
child pytest started with it set; in the parent they are skipped and
:func:`test_triton_kernels_under_the_interpreter` runs that child.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fdivctl import divergences, engine
from reference import ENTRIES, entry_id, reference_full, reference_topk

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="compiled on CUDA by tests/test_engine_cuda.py"),
]
case = pytest.mark.skipif(not INTERPRETED, reason="run in the interpreter's child process")


@pytest.mark.skipif(INTERPRETED, reason="this is the child")
def test_triton_kernels_under_the_interpreter():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=Path(__file__).parent.parent,
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" in done.stdout


def _set_block(monkeypatch, block):
    """Both row kernels' loops step ``block`` entries at a time (their warps and stages as launched)."""
    from fdivctl.engine import triton_chunk

    for name in ("STATS_LAUNCH", "GRAD_LAUNCH"):
        monkeypatch.setattr(triton_chunk, name, getattr(triton_chunk, name)._replace(block=block))


def _inputs(n=13, h=8, v=37, t_vocab=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = (torch.randn(v, h, generator=g) * 0.8).requires_grad_(True)
    bias = (torch.randn(v, generator=g) * 0.3).requires_grad_(True)
    t_hidden = torch.randn(n, h + 2, generator=g)
    t_weight = torch.randn(t_vocab, h + 2, generator=g) * 0.8
    tokens = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, bias, t_hidden, t_weight, tokens


@case
@pytest.mark.parametrize("entry", ENTRIES, ids=entry_id)
@pytest.mark.parametrize("kind", ["full", "head"])
@pytest.mark.parametrize("grad_mode", ["forward", "recompute"])
def test_triton_divergence_loss_matches_float64_reference(entry, kind, grad_mode):
    name, params = entry
    hidden, weight, bias, th, tw, _ = _inputs()
    t_logits = th @ tw.T
    target = engine.FullLogits(t_logits) if kind == "full" else engine.TeacherHead(th, tw)
    loss = engine.divergence_loss(
        hidden, weight, target, divergences.get(name, **params), bias=bias,
        temperature=1.4, chunk_size=5, grad_mode=grad_mode, kernel="triton",
    )
    got = torch.autograd.grad(loss, (hidden, weight, bias))
    leaves = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    ref = reference_full(name, params, leaves[0] @ leaves[1].T + leaves[2], t_logits.double(), 1.4).mean()
    expected = torch.autograd.grad(ref, leaves)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=1e-6)
    for ours, exact in zip(got, expected):
        torch.testing.assert_close(ours.double(), exact, rtol=2e-4, atol=2e-6)


@case
@pytest.mark.parametrize("vocab", ["truncate", "pad"])
def test_triton_vocabulary_policies_match_the_torch_path(vocab):
    t_vocab = 41 if vocab == "truncate" else 30
    hidden, weight, bias, th, tw, _ = _inputs(t_vocab=t_vocab)
    results = {}
    for kernel in ("torch", "triton"):
        loss = engine.divergence_loss(
            hidden, weight, engine.TeacherHead(th, tw, vocab=vocab), "jsd", bias=bias, chunk_size=4, kernel=kernel
        )
        results[kernel] = (loss, *torch.autograd.grad(loss, (hidden, weight, bias)))
    for ours, ref in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@case
@pytest.mark.parametrize("div", [None, "rkl", "fkl"])
@pytest.mark.parametrize("softcap", [None, 1.5])
def test_triton_token_loss_matches_the_torch_path(div, softcap):
    """The RL policy loss: a nonlinear objective of log-prob, entropy and divergence (cotangents
    by autograd on the [c] outputs, the logit gradient by the kernel) equals the reference path; also for a
    soft-capped head (the kernel's gradient, written over the logits, times the cap's slope)."""
    from fdivctl.objectives import grpo

    hidden, weight, bias, th, tw, tokens = _inputs(n=17)
    g = torch.Generator().manual_seed(3)
    old = -torch.rand(17, generator=g) * 4
    adv = torch.randn(17, generator=g)
    target = None if div is None else engine.FullLogits(th @ tw.T)

    def objective(out, rows):
        loss, _ = grpo.clipped_surrogate(out["logprob"], old[rows], adv[rows], 0.2, 0.28)
        loss = loss - 0.01 * out["entropy"] + (0.1 * out["divergence"] if div else 0.0)
        return loss.sum()

    results = {}
    for kernel in ("torch", "triton"):
        total, outputs = engine.token_loss(
            hidden, weight, objective, bias=bias, token_ids=tokens, entropy=True, target=target,
            divergence=div, temperature=0.8, chunk_size=6, kernel=kernel, softcap=softcap,
        )
        results[kernel] = (total, outputs.logprob, outputs.entropy, *torch.autograd.grad(total, (hidden, weight, bias)))
    for ours, ref in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def _masked_teacher(n, t_vocab, seed):
    """Teacher logits with ``−inf`` entries: row 0's whole first block of 16 columns, and scattered ones."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, t_vocab, generator=g) * 2
    logits[0, :16] = float("-inf")
    logits[torch.rand(n, t_vocab, generator=g) < 0.15] = float("-inf")
    logits[:, -1] = 3.0  # a finite entry per row, and a maximum that arrives in the last block
    return logits


@case
@pytest.mark.parametrize("div", [None, "fkl", "rkl", "jsd"])
def test_triton_rows_longer_than_a_block_match_the_torch_path(monkeypatch, div):
    """Rows of 37 columns in blocks of 16: the one-pass statistics (none, fkl, rkl) rescale a lane's sums
    whenever a block raises that lane's maximum and merge the lanes after the last block (its last five
    columns leave eleven lanes masked), the two-pass ones (jsd) loop too; the outputs and
    gradients equal the PyTorch path's. fkl and jsd see a teacher with ``−inf`` entries (one row's whole
    first block among them) and padded past its 30 columns; rkl, whose divergence is ~1e30 there, a finite
    teacher (its ``−inf`` case: the next test)."""
    _set_block(monkeypatch, 16)
    hidden, weight, bias, th, tw, tokens = _inputs(n=9)
    weight.data[:, 0] += torch.linspace(-3, 3, 37)  # per-row maxima in different blocks
    if div == "rkl":
        target = engine.FullLogits(th[:9] @ tw.T)
    else:
        target = engine.FullLogits(_masked_teacher(9, 30, 5), vocab="pad")

    def objective(out, rows):
        loss = (out["logprob"] * torch.linspace(-1, 1, 9)[rows]).sum() - 0.3 * out["entropy"].sum()
        return loss + (0.7 * out["divergence"].sum() if div else 0.0)

    results = {}
    for kernel in ("torch", "triton"):
        total, outputs = engine.token_loss(
            hidden, weight, objective, bias=bias, token_ids=tokens[:9], entropy=True,
            target=None if div is None else target, divergence=div, temperature=0.8, chunk_size=4, kernel=kernel,
        )
        extra = (outputs.divergence,) if div else ()
        results[kernel] = (total, outputs.logprob, outputs.entropy, *extra,
                           *torch.autograd.grad(total, (hidden, weight, bias)))
    for ours, ref in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


class _SharedMemoryShort:
    """A row kernel as a GPU with too little shared memory for pipelined loads has it: every launch with more than
    one stage refused with Triton's OutOfResources before it runs, as Triton refuses it; one stage runs the real
    kernel.  ``stages`` keeps the stages each launch asked for."""

    def __init__(self, kernel):
        self.kernel, self.stages = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from triton.runtime.errors import OutOfResources

            self.stages.append(kwargs["STAGES"])
            if kwargs["STAGES"] > 1:
                raise OutOfResources(98304, 65536, "shared memory")
            return self.kernel[grid](*args, **kwargs)

        return launch


@case
def test_a_gpu_short_of_shared_memory_runs_the_row_kernels_at_one_stage(monkeypatch):
    """The first launch of each kernel asks for its stages, is refused, and runs at one stage; later chunks ask for
    one stage at once; the loss and its gradients are the PyTorch path's."""
    from fdivctl.engine import triton_chunk

    monkeypatch.setattr(triton_chunk, "_ONE_STAGE", set())
    monkeypatch.setattr(triton_chunk, "STATS_LAUNCH", triton_chunk.STATS_LAUNCH._replace(stages=3))
    monkeypatch.setattr(triton_chunk, "GRAD_LAUNCH", triton_chunk.GRAD_LAUNCH._replace(stages=3))
    short = {name: _SharedMemoryShort(getattr(triton_chunk, name)) for name in ("_stats_kernel", "_grad_kernel")}
    for name, kernel in short.items():
        monkeypatch.setattr(triton_chunk, name, kernel)
    hidden, weight, _, th, tw, _ = _inputs()
    results = {}
    for kernel in ("torch", "triton"):
        loss = engine.divergence_loss(hidden, weight, engine.TeacherHead(th, tw), "fkl", chunk_size=4, kernel=kernel)
        results[kernel] = (loss, *torch.autograd.grad(loss, (hidden, weight)))
    for ours, ref in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for kernel in short.values():  # 13 rows in chunks of 4: four chunks
        assert kernel.stages == [3, 1, 1, 1, 1]


@case
@pytest.mark.parametrize("block", [16, 4096])
def test_triton_reverse_kl_where_the_target_has_no_mass(monkeypatch, block):
    """rkl against a teacher with ``−inf`` entries: ``log p`` floored at LOG_FLOOR there, so each row's
    divergence is ~1e30 × the student's mass on them, in the one-pass kernel as in the PyTorch path."""
    _set_block(monkeypatch, block)
    hidden, weight, _, _, _, tokens = _inputs(n=9)
    target = engine.FullLogits(_masked_teacher(9, 30, 6), vocab="pad")
    got = {kernel: engine.token_outputs(hidden, weight, token_ids=tokens[:9], entropy=True, target=target,
                                        divergence="rkl", temperature=1.3, kernel=kernel)
           for kernel in ("torch", "triton")}
    assert got["torch"].divergence.min() > 1e27
    for name in ("logprob", "entropy", "divergence"):
        torch.testing.assert_close(getattr(got["triton"], name), getattr(got["torch"], name), rtol=1e-5, atol=1e-6)


@case
@pytest.mark.parametrize("div", ["fkl", "rkl"])
def test_one_pass_divergence_is_precise_near_the_reference(div):
    """A policy next to its reference at a real vocabulary (V = 151936, logits up to ~30, D ≈ 6e-5, the RL
    regularizer's usual regime): the one-pass sums of logit differences give D within 1e-6 of float64 (measured
    2.7e-7; the two-pass kernel's per-element ``log q − log p`` was off by 1.7e-6) and H within 1e-6."""
    from fdivctl.engine import triton_chunk

    g = torch.Generator().manual_seed(0)
    n, v = 3, 151936
    z = torch.randn(n, v, generator=g) * 4
    z[:, :50] += 15
    t = z + torch.randn(n, v, generator=g) * 0.01
    stats = triton_chunk.chunk_stats(z, t, v, None, True, divergences.get(div), 1.0, out=torch.empty(6, n))
    log_q, log_p = torch.log_softmax(z.double(), -1), torch.log_softmax(t.double(), -1)
    exact = (log_q.exp() * (log_q - log_p)) if div == "rkl" else (log_p.exp() * (log_p - log_q))
    assert (stats[4].double() - exact.sum(-1)).abs().max() < 1e-6
    assert (stats[3].double() + (log_q.exp() * log_q).sum(-1)).abs().max() < 1e-6


@case
@pytest.mark.parametrize("grad_mode", ["forward", "recompute"])
@pytest.mark.parametrize("softcap", [None, 1.5])
def test_triton_kernels_write_into_the_gathered_weight_gradient_rows(grad_mode, softcap):
    """With ``weight_grad_rows`` over several chunks the gradient kernel writes each chunk's rows into the
    shared buffer (flushed full at 10 rows and part full at the end): the torch path's gradients; with soft-capped
    heads too (the student's slope multiplied into its rows of the buffer, the teacher capped before the kernel)."""
    hidden, weight, bias, th, tw, _ = _inputs()
    results = {}
    for kernel in ("torch", "triton"):
        loss = engine.divergence_loss(hidden, weight, engine.TeacherHead(th, tw, softcap=softcap), "fkl", bias=bias,
                                      chunk_size=5, grad_mode=grad_mode, kernel=kernel, weight_grad_rows=10,
                                      softcap=softcap)
        results[kernel] = (loss, *torch.autograd.grad(loss, (hidden, weight, bias)))
    for ours, ref in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def _store(n=13, v=37, k=7, temperature=1.0, seed=4, dtype=torch.float32):
    """A top-k store of a random teacher as ``teacher-logits`` writes it: distinct ids, log-probs at
    ``temperature`` in ``dtype``, the exact log tail (−inf when k = V).  The float64 references assume the
    k + 1 buckets sum to 1, which bf16 log-probs break by their rounding."""
    g = torch.Generator().manual_seed(seed)
    log_p = torch.log_softmax(torch.randn(n, v, generator=g) * 2 / temperature, -1)
    top, ids = log_p.topk(k, -1)
    log_tail = torch.logsumexp(log_p.scatter(-1, ids, float("-inf")), -1)
    return ids.to(torch.int32), top.to(dtype), log_tail


@case
@pytest.mark.parametrize(
    ("entry", "tail", "grad_mode"),
    [(entry, "tail", "forward") for entry in ENTRIES]
    + [(("jsd", {"beta": 0.2}), tail, mode) for tail, mode in
       (("renormalize", "forward"), ("ignore", "forward"), ("tail", "recompute"))],
    ids=lambda value: entry_id(value) if isinstance(value, tuple) else value,
)
def test_triton_topk_target_matches_float64_reference(entry, tail, grad_mode):
    """A logit store's k + 1 buckets (or k, renormalized or not) through the top-k chunk path: the k ids
    gathered and set to −inf, one row kernel for the rest, the gradient of the rest from a second, the k
    ids' written over it.  Every registry entry with the tail bucket (the entry changes only the derivatives
    the kernel is handed); the other tail modes and the recomputing backward with one."""
    name, params = entry
    hidden, weight, bias, *_ = _inputs()
    ids, logprobs, log_tail = _store()
    loss = engine.divergence_loss(
        hidden, weight, engine.TopK(ids, logprobs, log_tail, tail=tail), divergences.get(name, **params),
        bias=bias, chunk_size=5, grad_mode=grad_mode, kernel="triton",
    )
    got = torch.autograd.grad(loss, (hidden, weight, bias))
    leaves = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    ref = reference_topk(name, params, leaves[0] @ leaves[1].T + leaves[2], ids, logprobs, log_tail, tail).mean()
    expected = torch.autograd.grad(ref, leaves)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=1e-6)
    for ours, exact in zip(got, expected):
        torch.testing.assert_close(ours.double(), exact, rtol=2e-4, atol=2e-6)


@case
@pytest.mark.parametrize("k", [1, 7, 36, 37])
@pytest.mark.parametrize("tail", ["tail", "renormalize", "ignore"])
def test_triton_topk_token_loss_matches_the_torch_path(k, tail):
    """The RL outputs against a top-k reference (``--div-estimator full --ref-logits``): log-prob of tokens
    inside and outside the k ids, entropy and divergence under a nonlinear objective, a store re-tempered
    (made at T = 0.8, read at 1.3), rows where the k ids leave one entry or none (k = V: no tail, the rest's
    statistics 0/0) and, at k = 7, a soft-capped head; values and gradients equal the PyTorch path's."""
    from fdivctl.objectives import grpo

    softcap = 1.5 if k == 7 else None

    hidden, weight, bias, _, _, tokens = _inputs()
    ids, logprobs, log_tail = _store(k=k, temperature=0.8, dtype=torch.bfloat16)
    tokens[:5] = ids[:5, -1]  # some given tokens among the k ids (the δ term lands on an entry written over)
    g = torch.Generator().manual_seed(3)
    old = -torch.rand(13, generator=g) * 4
    adv = torch.randn(13, generator=g)

    def objective(out, rows):
        loss, _ = grpo.clipped_surrogate(out["logprob"], old[rows], adv[rows], 0.2, 0.28)
        return (loss - 0.01 * out["entropy"] + 0.1 * out["divergence"]).sum()

    results = {}
    for kernel in ("torch", "triton"):
        target = engine.TopK(ids, logprobs, log_tail, temperature=0.8, tail=tail)
        total, outputs = engine.token_loss(
            hidden, weight, objective, bias=bias, token_ids=tokens, entropy=True, target=target, divergence="jsd",
            temperature=1.3, chunk_size=4, kernel=kernel, softcap=softcap,
        )
        results[kernel] = (total, outputs.logprob, outputs.entropy, outputs.divergence,
                           *torch.autograd.grad(total, (hidden, weight, bias)))
    for ours, ref in zip(results["triton"], results["torch"]):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@case
@pytest.mark.parametrize("want", ["outputs", "gathered-rows"])
def test_triton_topk_rows_longer_than_a_block(monkeypatch, want):
    """Blocks of 16 over rows of 37 with the k ids spread over every block; the per-token outputs alone
    (``token_outputs``, no gradient), and the gradient written into the rows gathered for one weight-gradient
    GEMM; both equal the PyTorch path's."""
    _set_block(monkeypatch, 16)
    hidden, weight, bias, _, _, tokens = _inputs()
    weight.data[:, 0] += torch.linspace(-3, 3, 37)  # per-row maxima in different blocks
    ids, logprobs, log_tail = _store(k=9)
    results = {}
    for kernel in ("torch", "triton"):
        target = engine.TopK(ids, logprobs, log_tail)
        if want == "outputs":
            out = engine.token_outputs(hidden.detach(), weight.detach(), token_ids=tokens, entropy=True,
                                       target=target, divergence="rkl", chunk_size=4, kernel=kernel)
            results[kernel] = tuple(out)
        else:
            loss = engine.divergence_loss(hidden, weight, target, "fkl", bias=bias, chunk_size=3,
                                          weight_grad_rows=8, kernel=kernel)
            results[kernel] = (loss, *torch.autograd.grad(loss, (hidden, weight, bias)))
    for ours, ref in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@case
@pytest.mark.parametrize("weights", ["confidence", [0.3, 0.7]])
@pytest.mark.parametrize("vocabs", [(37, 37), (41, 30)])
def test_triton_teacher_mixture_matches_the_torch_path(weights, vocabs):
    """Multi-teacher distillation's target (MAD-OPD's confidence weights or fixed ones), with teachers padded to a
    larger head and lacking ids: its log-probabilities made per chunk (times T) and read by the dense kernels as
    a full-logit target; jsd's loss and the RL outputs against rkl equal the PyTorch path's."""
    hidden, weight, bias, th, _, tokens = _inputs()
    g = torch.Generator().manual_seed(7)
    heads = [torch.randn(t_vocab, th.shape[1], generator=g) * 0.8 for t_vocab in vocabs]

    def objective(out, rows):
        loss = (out["logprob"] * torch.linspace(-1, 1, 13)[rows]).sum() - 0.3 * out["entropy"].sum()
        return loss + 0.7 * out["divergence"].sum()

    results = {}
    for kernel in ("torch", "triton"):
        mixture = engine.TeacherMixture(
            [engine.TeacherHead(th, w, vocab={37: "strict", 41: "truncate", 30: "pad"}[w.shape[0]]) for w in heads],
            weights,
        )
        loss = engine.divergence_loss(hidden, weight, mixture, "jsd", bias=bias, temperature=1.7, chunk_size=5,
                                      kernel=kernel)
        total, outputs = engine.token_loss(hidden, weight, objective, bias=bias, token_ids=tokens, entropy=True,
                                           target=mixture, divergence="rkl", temperature=0.8, chunk_size=4,
                                           kernel=kernel)
        results[kernel] = (loss, *torch.autograd.grad(loss, (hidden, weight, bias)), total, *outputs,
                           *torch.autograd.grad(total, (hidden, weight, bias)))
    for ours, ref in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@case
def test_objective_without_gradient_gives_zero_gradients():
    hidden, weight, _, _, _, tokens = _inputs()
    total, _ = engine.token_loss(
        hidden, weight, lambda out, rows: out["logprob"].detach().sum(), token_ids=tokens, kernel="triton"
    )
    gh, gw = torch.autograd.grad(total, (hidden, weight))
    assert gh.abs().max() == 0 and gw.abs().max() == 0


@case
def test_kernel_choice():
    hidden, weight, _, th, tw, tokens = _inputs()

    class OwnTarget(engine.Target):  # a user's target with only the PyTorch path's support()
        n_tokens = 13

        def take(self, index):
            return self

        def validate(self, n_tokens, vocab_size):
            pass

        def support(self, rows, log_q, temperature):
            return log_q, torch.log_softmax(th[rows] @ tw.T / temperature, -1)

    with pytest.raises(ValueError, match="OwnTarget targets run on the PyTorch path"):
        engine.divergence_loss(hidden, weight, OwnTarget(), "fkl", kernel="triton")
    assert float(engine.divergence_loss(hidden, weight, OwnTarget(), "fkl", kernel="auto")) > 0
    with pytest.raises(ValueError, match="fp64 inputs"):
        engine.token_outputs(hidden.double(), weight.double(), token_ids=tokens, kernel="triton")
    with pytest.raises(ValueError, match="kernel='cuda'; valid: auto, torch, triton"):
        engine.token_outputs(hidden, weight, token_ids=tokens, kernel="cuda")
    # "auto" keeps the CPU on the PyTorch path, even under the interpreter
    from fdivctl.engine.sweep import resolve_kernel

    assert resolve_kernel("auto", hidden, engine.TeacherHead(th, tw)) == "torch"
    assert resolve_kernel("triton", hidden, engine.TeacherHead(th, tw)) == "triton"


@case
@pytest.mark.parametrize("k", [1, 7, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_triton_head_topk_matches_the_torch_path(k, temperature):
    """The logit store's summary: one pass of candidate compaction and tail sums equals topk + scatter +
    logsumexp; a flat row (more candidates than the buffer holds) takes the exact fallback."""
    from fdivctl.engine.topk import head_topk

    g = torch.Generator().manual_seed(k)
    n, h, v = 9, 16, 5000
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g)
    hidden[4] = 0.0  # every logit equal: the fallback, and ties at the k-th value
    tokens = torch.randint(0, v, (n,), generator=g)
    got = head_topk(hidden, weight, k, tokens, temperature=temperature, kernel="triton", chunk_size=4)
    ref = head_topk(hidden, weight, k, tokens, temperature=temperature, kernel="torch", chunk_size=4)
    torch.testing.assert_close(got.logprobs, ref.logprobs, rtol=0, atol=2e-5)
    torch.testing.assert_close(got.log_tail, ref.log_tail, rtol=0, atol=2e-5)
    torch.testing.assert_close(got.token_logprob, ref.token_logprob, rtol=0, atol=2e-5)
    clean = [r for r in range(n) if r != 4]
    assert torch.equal(got.ids[clean], ref.ids[clean])
    logits = hidden @ weight.T
    assert torch.equal(logits.gather(-1, got.ids.long()), logits.gather(-1, ref.ids.long()))


@case
@pytest.mark.parametrize("vocab", [5000, 900])
def test_triton_head_topk_tail_against_float64(monkeypatch, vocab):
    """The one-pass summary with 64-wide blocks (11–91 candidates per row in 79 blocks: 18–69 of a row's
    blocks hold none, which the compaction skips) and a vocabulary narrower than the candidate buffer (every
    entry a candidate): top-k log-probs, log tail and the tokens' log-probs equal float64 sums over the same fp32
    logits."""
    from fdivctl.engine import triton_topk
    from fdivctl.engine.topk import head_topk

    monkeypatch.setattr(triton_topk, "BLOCK", 64)
    g = torch.Generator().manual_seed(vocab)
    n, h, k, temperature = 7, 16, 5, 0.8
    hidden, weight = torch.randn(n, h, generator=g) * 2, torch.randn(vocab, h, generator=g)
    tokens = torch.randint(0, vocab, (n,), generator=g)
    got = head_topk(hidden, weight, k, tokens, temperature=temperature, kernel="triton", chunk_size=4)
    logp = torch.log_softmax((hidden @ weight.T).double() / temperature, dim=-1)  # the head's fp32 logits
    top, ids = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    assert torch.equal(got.ids.long(), ids)
    torch.testing.assert_close(got.logprobs.double(), top, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.log_tail.double(), rest, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.token_logprob.double(), logp.gather(-1, tokens[:, None]).squeeze(-1),
                               rtol=0, atol=1e-5)


@case
def test_triton_head_topk_with_a_masked_block_of_the_vocabulary():
    """A bias of −inf over the first 2500 ids (more than one kernel block): the summary's running sums skip
    the blocks of −inf only instead of making −inf − (−inf) = NaN (they did), and equal the torch path."""
    from fdivctl.engine.topk import head_topk

    g = torch.Generator().manual_seed(11)
    n, h, v = 6, 16, 5000
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    bias = torch.zeros(v)
    bias[:2500] = float("-inf")
    tokens = torch.randint(2500, v, (n,), generator=g)
    got = head_topk(hidden, weight, 7, tokens, bias=bias, temperature=0.9, kernel="triton", chunk_size=4)
    ref = head_topk(hidden, weight, 7, tokens, bias=bias, temperature=0.9, kernel="torch", chunk_size=4)
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
