"""Triton kernels for one chunk of the sweep: per-token outputs and ``∂/∂z`` in two row passes.

For a chunk of fp32 student logits ``z [c, V]`` (and, for a dense target, the
target's logits ``t [c, Vₜ]``), one program per row:

* :func:`_stats_kernel` — ``log q(y)``, ``H(q) = −Σ q log q``,
  ``D = Σ_i g(log q_i, log p_i)`` (the registry entry's summand) and
  ``S = Σ_i ∂g/∂log q_i``.  Without a divergence and for fkl / rkl (the RL
  regularizer's and distillation's usual choices) in one read of the row, all
  sums kept against running maxima (:func:`_one_pass_stats`); for the others in
  two: the log-partition functions of ``z/T`` and ``t/T`` first, then the
  summands of the normalized log-probs (:func:`_two_pass_stats`).  With the
  gradient pass that makes 2 reads of ``z`` and ``t`` per row instead of 3 (18
  instead of 26 bytes per vocabulary entry with fp32 logits and a bf16
  gradient).  Every sum is kept per lane of the block and reduced across the
  block once, after the loop: reduced at every block (a cross-warp reduction
  and barrier each, six per block for rkl), the one-pass kernel moved its 466
  MB per chunk of 384 rows (rkl ``full``, V = 151936) in 305 µs on an H100, 46 %
  of HBM bandwidth, where the gradient kernel, which reduces nothing, moved 583
  MB in 209 µs (83 %; ``bench/results/train_step_cuda_h100_profile.txt``).  On
  an H200, per-lane against per-block in one run (``bench/chunk_kernels.py``,
  ``bench/results/row_kernels_cuda_h200.txt``): rkl 245 vs 326 µs, fkl 211 vs
  261 µs, jsd (two passes) 321 vs 486 µs; without a divergence 131 vs 121 µs.
* :func:`_grad_kernel` — given per-token cotangents ``c_lp, c_ent, c_div``
  (the objective's derivative with respect to each output) writes

  ``∂L/∂z_j = (1/T) [c_div (a_j − q_j S) − c_ent q_j (log q_j + H) + c_lp (δ_{j,y} − q_j)]``

  with ``a_j = ∂g/∂log q_j``: the chain rule through ``log q = z/T − log Z``
  (``∂ log q_i / ∂z_j = (δ_ij − q_j)/T``).  It writes the gradient in the
  dtype the backward matmuls read (bf16 for a bf16 head), so they read it
  directly with no cast.  For a top-k target (``REST``) both kernels run on the
  row with the k ids set to ``−inf``, without a divergence: the statistics give
  the rest's log-partition and entropy, and the gradient is the part that flows
  through them (:func:`chunk_grad`); the divergence over the k + 1 buckets is
  taken on ``[c, k]`` tensors by the caller (``fdivctl.engine.sweep``).

The summands ``g`` and their derivatives ``a`` are those of
:mod:`fdivctl.divergences` (their docstrings give the formulas and sources):

* fkl ``p(log p − log q)``, ``a = −p``;
* rkl ``q(log q − log p)``, ``a = q(log q − log p + 1)``;
* jsd ``β p(log p − log m) + (1−β) q(log q − log m)``, ``m = βp + (1−β)q``,
  ``a = (1−β) q (log q − log m)``;
* tv ``½|p − q|``, ``a = ½ sign(q − p) q`` (0 where equal, as the reference);
* hellinger ``½(√p − √q)²``, ``a = ½(q − √(pq))``;
* alpha ``(αp + (1−α)q − p^α q^(1−α)) / (α(1−α))``, ``a = (q − p^α q^(1−α)) / α``;
* skl ``p(log p − log r)``, ``r = λp + (1−λ)q``, ``a = −(1−λ) p q / r``;
* srkl ``q(log q − log r)``, ``r = λq + (1−λ)p``, ``a = q(log q − log r) + (1−λ) q p / r``.

Mixtures are taken in log space (logaddexp), and ``log p`` is floored at
:data:`~fdivctl.divergences.logspace.LOG_FLOOR` so padded entries give exact
zeros, as in the PyTorch path.  This is the pattern of Liger-Kernel's chunked
fused-linear losses (logits of a chunk, a row kernel, the gradient handed to
the backward matmuls), done for every registry divergence and for the RL
outputs (log-prob, entropy) with any per-token objective on top.

Runs on CUDA; on the CPU only under Triton's interpreter (``TRITON_INTERPRET=1``,
set before the first import of triton), which the tests use.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from fdivctl.divergences import Divergence
from fdivctl.divergences.alpha import AlphaDivergence
from fdivctl.divergences.hellinger import SquaredHellinger
from fdivctl.divergences.jsd import GeneralizedJSD
from fdivctl.divergences.kl import ForwardKL, ReverseKL, SkewKL, SkewReverseKL
from fdivctl.divergences.logspace import LOG_FLOOR
from fdivctl.divergences.tv import TotalVariation

NO_DIVERGENCE = -1
FKL, RKL, JSD, TV, HELLINGER, ALPHA, SKL, SRKL = range(8)
STAT_ROWS = ("lse_q", "lse_p", "logprob", "entropy", "divergence", "slope")


class Launch(NamedTuple):
    """How a row kernel is launched: ``block`` vocabulary entries per loop step, ``warps`` per program (one
    program per row) and ``stages``, the loop's software-pipelining depth (``tl.range(num_stages=…)``: the loads
    of the next ``stages − 1`` steps issued before this one's arithmetic; 1 = none)."""

    block: int
    warps: int
    stages: int


#: the statistics kernel's launch for the one-pass divergences (none, fkl, rkl): half the gradient kernel's block, as
#: each of its up to nine per-lane sums holds block / (32 · warps) registers per thread (4 here; 8 at 4096 would
#: crowd the 128 a thread of 16 warps may have).  Three stages: on an H100, per 384 × 151936 fp32 chunk
#: (``bench/chunk_kernels.py --launches``), fkl 236 → 207 µs, rkl 259 → 211, none 151 → 125 against one stage;
#: two stages were slower than one (fkl 250, rkl 336).
STATS_LAUNCH = Launch(block=2048, warps=16, stages=3)
#: the same for the two-pass divergences (jsd and the others), whose statistics read the row twice: three stages
#: took jsd from 366 to 386 µs there, two to 504
TWO_PASS_STATS_LAUNCH = Launch(block=2048, warps=16, stages=1)
#: the gradient kernel's: three stages took jsd 282 → 246 µs and rkl 275 → 243 there, fkl and none unchanged
GRAD_LAUNCH = Launch(block=4096, warps=16, stages=3)
_LOG_FLOOR = tl.constexpr(LOG_FLOOR)
_FKL = tl.constexpr(FKL)
_RKL = tl.constexpr(RKL)


def divergence_code(divergence: Divergence | None) -> tuple[int, float, float, float]:
    """``(code, w, log w, log(1−w))`` for a registry entry: the kernel's switch and its parameter."""
    if divergence is None:
        return NO_DIVERGENCE, 0.0, 0.0, 0.0
    if isinstance(divergence, SkewKL | SkewReverseKL) and divergence.lam == 0.0:
        divergence = ForwardKL() if isinstance(divergence, SkewKL) else ReverseKL()
    codes: dict[type, tuple[int, float]] = {
        ForwardKL: (FKL, 0.5),
        ReverseKL: (RKL, 0.5),
        TotalVariation: (TV, 0.5),
        SquaredHellinger: (HELLINGER, 0.5),
    }
    if type(divergence) in codes:
        code, w = codes[type(divergence)]
    elif isinstance(divergence, GeneralizedJSD):
        code, w = JSD, divergence.beta
    elif isinstance(divergence, AlphaDivergence):
        code, w = ALPHA, divergence.alpha
    elif isinstance(divergence, SkewKL):
        code, w = SKL, divergence.lam
    elif isinstance(divergence, SkewReverseKL):
        code, w = SRKL, divergence.lam
    else:
        raise ValueError(f"no Triton kernel for divergence {divergence!r}")
    return code, w, math.log(w), math.log1p(-w)


def supports(divergence: Divergence | None) -> bool:
    """Whether the kernels implement ``divergence`` (every registry entry does)."""
    try:
        divergence_code(divergence)
    except ValueError:
        return False
    return True


@triton.jit
def _logaddexp(x, y):
    m = tl.maximum(x, y)
    return m + tl.log(tl.exp(x - m) + tl.exp(y - m))


@triton.jit
def _summand(lq, lp, DIV: tl.constexpr, w, log_w, log_1mw):
    """``(g, ∂g/∂log q)`` of the divergence ``DIV`` at one support element."""
    q = tl.exp(lq)
    p = tl.exp(lp)
    if DIV == 0:  # fkl
        g = p * (lp - lq)
        a = -p
    elif DIV == 1:  # rkl
        g = q * (lq - lp)
        a = g + q
    elif DIV == 2:  # jsd, w = beta
        lm = _logaddexp(lp + log_w, lq + log_1mw)
        a = (1.0 - w) * q * (lq - lm)
        g = w * p * (lp - lm) + a
    elif DIV == 3:  # tv
        d = q - p
        g = 0.5 * tl.abs(d)
        a = 0.5 * q * tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    elif DIV == 4:  # hellinger
        sq = tl.exp(0.5 * lq)
        sp = tl.exp(0.5 * lp)
        g = 0.5 * (sp - sq) * (sp - sq)
        a = 0.5 * (q - sq * sp)
    elif DIV == 5:  # alpha, w = alpha
        geo = tl.exp(w * lp + (1.0 - w) * lq)
        g = (w * p + (1.0 - w) * q - geo) / (w * (1.0 - w))
        a = (q - geo) / w
    elif DIV == 6:  # skl, w = lambda
        lr = _logaddexp(lp + log_w, lq + log_1mw)
        g = p * (lp - lr)
        a = -(1.0 - w) * tl.exp(lp + lq - lr)
    else:  # srkl, w = lambda
        lr = _logaddexp(lq + log_w, lp + log_1mw)
        g = q * (lq - lr)
        a = g + (1.0 - w) * tl.exp(lq + lp - lr)
    return g, a


@triton.jit
def lane_step(m, x):
    """One block ``x`` of an online softmax kept per lane, with no reduction across the block:
    ``(m', r, w, d, c)`` with ``m' = max(m, x)`` the lane's new maximum, ``r = e^{m − m'}`` the factor the lane's
    sums so far take, ``w = e^{x − m'}`` the new term's weight, ``d = m − m'`` and ``c = x − m'`` (0 where ``w``
    is 0).  One exponential per element: ``e^{−|x − m|}`` is ``r`` where ``x`` raises the maximum and ``w``
    where it does not.  A lane still at −inf gives r = 1, w = 0, d = c = 0 for an −inf ``x``, and r = 0, w = 1,
    d = c = 0 for its first finite one; no −inf − (−inf) is formed, even where ``where`` does not take it."""
    up = x > m
    hi = tl.maximum(m, x)
    e = tl.exp(tl.minimum(m, x) - tl.where(hi == float("-inf"), 0.0, hi))  # 0 where both are −inf
    r = tl.where(up, e, 1.0)
    w = tl.where(up, 1.0, e)
    known = m > float("-inf")
    m_finite = tl.where(known, m, 0.0)
    d = tl.where(up & known, m_finite - x, 0.0)
    c = tl.where(up | (x == float("-inf")), 0.0, x - m_finite)
    return hi, r, w, d, c


@triton.jit
def lane_weights(m):
    """``(M, f, δ)`` that merge per-lane sums kept against maxima ``m``: ``M = max m``, ``f = e^{m − M}`` and
    ``δ = m − M`` (0 and 0 on lanes that met no finite entry): ``Σ_lanes f·s`` is the row's ``Σ e^{x − M}``."""
    big = tl.max(m, 0)
    empty = m == float("-inf")
    delta = tl.where(empty, 0.0, m - tl.where(big == float("-inf"), 0.0, big))
    return big, tl.where(empty, 0.0, tl.exp(delta)), delta


@triton.jit
def _online_lses(z_row, t_row, n_cols, t_width, inv_t, WITH_T: tl.constexpr, BLOCK: tl.constexpr,
                 STAGES: tl.constexpr):
    """``(log Σ_j exp(z_j / T), log Σ_j exp(t_j / T))`` over one row, both in one loop over its blocks (running
    maxima and rescaled sums per lane, merged at the end); the second is 0 without ``WITH_T``."""
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    m_t = tl.full([BLOCK], float("-inf"), tl.float32)
    s_t = tl.zeros([BLOCK], tl.float32)
    for start in tl.range(0, n_cols, BLOCK, num_stages=STAGES):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(z_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32) * inv_t
        m, r, w, _, _ = lane_step(m, x)
        s = r * s + w
        if WITH_T:
            y = tl.load(t_row + cols, mask=cols < t_width, other=float("-inf")).to(tl.float32) * inv_t
            m_t, r_t, w_t, _, _ = lane_step(m_t, y)
            s_t = r_t * s_t + w_t
    big, f, _ = lane_weights(m)
    lse_t = 0.0
    if WITH_T:
        big_t, f_t, _ = lane_weights(m_t)
        lse_t = big_t + tl.log(tl.sum(f_t * s_t, 0))
    return big + tl.log(tl.sum(f * s, 0)), lse_t


@triton.jit
def _load_log_p(t_row, cols, mask, t_width, inv_t, lse_p):
    t = tl.load(t_row + cols, mask=mask & (cols < t_width), other=float("-inf")).to(tl.float32)
    return tl.maximum(t * inv_t - lse_p, _LOG_FLOOR)


@triton.jit
def _stats_kernel(
    z_ptr, z_stride, t_ptr, t_stride, t_width, y_ptr, stats_ptr, stats_stride, n_cols, inv_t,
    w, log_w, log_1mw,
    DIV: tl.constexpr, HAS_Y: tl.constexpr, WANT_ENT: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    t_row = t_ptr + row * t_stride
    if DIV <= _RKL:  # none, fkl, rkl: every statistic in one read of the row
        lse_q, lse_p, ent, div, slope = _one_pass_stats(z_row, t_row, n_cols, t_width, inv_t, DIV, WANT_ENT, BLOCK,
                                                        STAGES)
    else:
        lse_q, lse_p, ent, div, slope = _two_pass_stats(z_row, t_row, n_cols, t_width, inv_t, w, log_w, log_1mw,
                                                        DIV, WANT_ENT, BLOCK, STAGES)
    logprob = 0.0
    if HAS_Y:
        y = tl.load(y_ptr + row)
        logprob = tl.load(z_row + y) * inv_t - lse_q
    tl.store(stats_ptr + row, lse_q)
    tl.store(stats_ptr + stats_stride + row, lse_p)
    tl.store(stats_ptr + 2 * stats_stride + row, logprob)
    tl.store(stats_ptr + 3 * stats_stride + row, -ent)
    tl.store(stats_ptr + 4 * stats_stride + row, div)
    tl.store(stats_ptr + 5 * stats_stride + row, slope)


@triton.jit
def _two_pass_stats(
    z_row, t_row, n_cols, t_width, inv_t, w, log_w, log_1mw,
    DIV: tl.constexpr, WANT_ENT: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr,
):
    """``(lse_q, lse_p, Σ q log q, D, S)`` of one row for any divergence: the log-partitions first
    (:func:`_online_lses`), then the summands ``g`` and ``a`` from the normalized log-probs."""
    lse_q, lse_p = _online_lses(z_row, t_row, n_cols, t_width, inv_t, DIV >= 0, BLOCK, STAGES)
    ent = tl.zeros([BLOCK], tl.float32)  # per lane, summed once at the end
    div = tl.zeros([BLOCK], tl.float32)
    slope = tl.zeros([BLOCK], tl.float32)
    if WANT_ENT or DIV >= 0:
        for start in tl.range(0, n_cols, BLOCK, num_stages=STAGES):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            lq = tl.load(z_row + cols, mask=mask, other=0.0) * inv_t - lse_q
            if WANT_ENT:
                ent += tl.where(mask, tl.exp(lq) * lq, 0.0)
            if DIV >= 0:
                lp = _load_log_p(t_row, cols, mask, t_width, inv_t, lse_p)
                g, a = _summand(lq, lp, DIV, w, log_w, log_1mw)
                div += tl.where(mask, g, 0.0)
                slope += tl.where(mask, a, 0.0)
    return lse_q, lse_p, tl.sum(ent, 0), tl.sum(div, 0), tl.sum(slope, 0)


@triton.jit
def _one_pass_stats(
    z_row, t_row, n_cols, t_width, inv_t, DIV: tl.constexpr, WANT_ENT: tl.constexpr, BLOCK: tl.constexpr,
    STAGES: tl.constexpr,
):
    """``(lse_q, lse_p, Σ q log q, D, S)`` of one row in a single read of ``z`` (and ``t``), for no
    divergence, fkl or rkl: every sum is kept relative to a running maximum and rescaled when it grows
    (the online softmax of Milakov & Gimelshein, "Online normalizer calculation for softmax", 2018, Alg. 3,
    carried to the sums below), so nothing needs ``log Z`` before the end.  Each lane of the block keeps its own
    maximum and sums (:func:`lane_step`), merged across lanes once after the loop (:func:`lane_weights`).

    With ``x = z/T``, ``y = t/T``, ``m`` / ``mₚ`` the running maxima, ``s = Σ e^{x−m}``, ``sₚ = Σ e^{y−mₚ}``
    (``log Z = m + log s``) and F the columns where ``y`` is finite:

    * ``Σ q log q = u/s − log s``, ``u = Σ e^{x−m}(x − m)``;
    * fkl ``Σ_F p(log p − log q) = Σ_F e^{y−mₚ}(y − x)/sₚ + log Z_q − log Z_p``; ``S = −Σ p = −1``;
    * rkl ``Σ_F q(log q − log p) = [Σ_F e^{x−m}(x − y) − (log Z_q − log Z_p) Σ_F e^{x−m}]/s``, plus, where
      ``y = −∞`` (``log p`` floored at LOG_FLOOR, as in the two-pass path),
      ``Σ q(log q − LOG_FLOOR) = [Σ e^{x−m}(x − m) − (log s + LOG_FLOOR) Σ e^{x−m}]/s``; ``S = D + 1``.

    Each sum of differences (``x − y``) stays as precise as the two-pass path's per-element ``log q − log p``:
    for π_θ = π_ref both give D = 0 exactly.  Rescaling ``Σ e^{x−m}(x − m)`` to a new maximum ``m'`` is
    ``e^{m−m'} (u + (m − m') s)``.
    """
    m = tl.full([BLOCK], float("-inf"), tl.float32)  # every running sum per lane, merged after the loop
    s = tl.zeros([BLOCK], tl.float32)
    u = tl.zeros([BLOCK], tl.float32)
    m_p = tl.full([BLOCK], float("-inf"), tl.float32)
    s_p = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK], tl.float32)  # fkl: Σ_F e^{y−mₚ}(y − x); rkl: Σ_F e^{x−m}(x − y)
    mass_f = tl.zeros([BLOCK], tl.float32)  # rkl: Σ_F e^{x−m}
    u_inf = tl.zeros([BLOCK], tl.float32)  # rkl: Σ_{y=−∞} e^{x−m}(x − m)
    mass_inf = tl.zeros([BLOCK], tl.float32)  # rkl: Σ_{y=−∞} e^{x−m}
    for start in tl.range(0, n_cols, BLOCK, num_stages=STAGES):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        m_new, r, e, drop, centred = lane_step(m, x)
        if WANT_ENT:
            u = r * (u + drop * s) + e * centred
        if DIV >= 0:
            y = tl.load(t_row + cols, mask=mask & (cols < t_width), other=float("-inf")).to(tl.float32) * inv_t
            finite = y > float("-inf")
            m_p, r_p, e_p, _, _ = lane_step(m_p, y)
            # y − x where the teacher is finite (the student is, there), 0 elsewhere: no −inf − (−inf) to discard
            y_minus_x = tl.where(finite, y, 0.0) - tl.where(finite, x, 0.0)
            if DIV == _FKL:
                acc = r_p * acc + e_p * y_minus_x
            else:
                acc = r * acc - e * y_minus_x
                mass_f = r * mass_f + tl.where(finite, e, 0.0)
                u_inf = r * (u_inf + drop * mass_inf) + tl.where(finite, 0.0, e * centred)
                mass_inf = r * mass_inf + tl.where(finite, 0.0, e)
            s_p = r_p * s_p + e_p
        s = r * s + e
        m = m_new
    big, f, delta = lane_weights(m)  # each lane's sums carried to the row's maximum: × e^{m−M}, u also + δ·s
    s_row = tl.sum(f * s, 0)
    log_s = tl.log(s_row)
    lse_q = big + log_s
    lse_p = 0.0
    div = 0.0
    slope = 0.0
    if DIV >= 0:
        big_p, f_p, _ = lane_weights(m_p)
        s_p_row = tl.sum(f_p * s_p, 0)
        log_s_p = tl.log(s_p_row)
        lse_p = big_p + log_s_p
        gap = (big - big_p) + (log_s - log_s_p)  # log Z_q − log Z_p, without adding two large numbers first
        if DIV == _FKL:
            div = tl.sum(f_p * acc, 0) / s_p_row + gap
            slope = -1.0
        else:
            merged = tl.sum(f * (acc - gap * mass_f + u_inf + delta * mass_inf - (log_s + _LOG_FLOOR) * mass_inf), 0)
            div = merged / s_row
            slope = div + 1.0
    ent = 0.0
    if WANT_ENT:
        ent = tl.sum(f * (u + delta * s), 0) / s_row - log_s
    return lse_q, lse_p, ent, div, slope


@triton.jit
def _grad_kernel(
    z_ptr, z_stride, t_ptr, t_stride, t_width, y_ptr, stats_ptr, stats_stride, cot_ptr, g_ptr, g_stride,
    n_rows, n_cols, inv_t, w, log_w, log_1mw,
    DIV: tl.constexpr, HAS_Y: tl.constexpr, WANT_ENT: tl.constexpr, REST: tl.constexpr, BLOCK: tl.constexpr,
    STAGES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    t_row = t_ptr + row * t_stride
    g_row = g_ptr + row * g_stride
    lse_q = tl.load(stats_ptr + row)
    lse_p = tl.load(stats_ptr + stats_stride + row)
    entropy = tl.load(stats_ptr + 3 * stats_stride + row)
    slope = tl.load(stats_ptr + 5 * stats_stride + row)
    c_lp = tl.load(cot_ptr + row) * inv_t
    c_ent = tl.load(cot_ptr + n_rows + row) * inv_t
    c_div = tl.load(cot_ptr + 2 * n_rows + row) * inv_t
    c_rest = 0.0
    if REST:
        c_rest = tl.load(cot_ptr + 3 * n_rows + row) * inv_t
    y = -1
    if HAS_Y:
        y = tl.load(y_ptr + row)
    for start in tl.range(0, n_cols, BLOCK, num_stages=STAGES):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        if REST:  # −inf entries (the top k): q = 0, and no −inf − (−inf) where the whole row is −inf
            x = tl.load(z_row + cols, mask=mask, other=float("-inf")) * inv_t
            finite = x > float("-inf")
            lq = tl.where(finite, x - lse_q, 0.0)
            q = tl.where(finite, tl.exp(lq), 0.0)
        else:
            lq = tl.load(z_row + cols, mask=mask, other=0.0) * inv_t - lse_q
            q = tl.exp(lq)
        grad = tl.zeros([BLOCK], dtype=tl.float32)
        if REST:
            grad += c_rest * q
            if HAS_Y:
                grad += tl.where(cols == y, c_lp, 0.0)
        elif HAS_Y:
            grad += c_lp * (tl.where(cols == y, 1.0, 0.0) - q)
        if WANT_ENT:
            grad -= c_ent * q * (lq + entropy)
        if DIV >= 0:
            lp = _load_log_p(t_row, cols, mask, t_width, inv_t, lse_p)
            _, a = _summand(lq, lp, DIV, w, log_w, log_1mw)
            grad += c_div * (a - q * slope)
        tl.store(g_row + cols, grad.to(g_ptr.dtype.element_ty), mask=mask)


def _row_args(logits, target_logits, vocab_size, token_ids, divergence) -> tuple[tuple, dict]:
    """The positional arguments both kernels start with and the divergence's switch and parameters."""
    code, w, log_w, log_1mw = divergence_code(divergence)
    t = logits if target_logits is None else target_logits
    ids = logits if token_ids is None else token_ids  # any pointer when HAS_Y is off
    rows = (logits, logits.stride(0), t, t.stride(0), min(t.shape[1], vocab_size), ids)
    return rows, {"w": w, "log_w": log_w, "log_1mw": log_1mw, "DIV": code, "HAS_Y": token_ids is not None}


#: launches (kernel, settings, device) that ran out of shared memory with their stages: they run at one stage
_ONE_STAGE: set[tuple] = set()


def _launch(kernel, launch: Launch, logits: torch.Tensor, *args, **kwargs) -> None:
    """``kernel`` over ``logits``' rows, one program each, with ``launch``'s block, warps and stages.  Pipelined
    loads wait in shared memory (the gradient kernel's three stages of fp32 blocks of the two rows: up to 96 KB),
    which can be more than a GPU gives a program (~100 KB on sm89, 64 KB on sm75); there Triton refuses the launch
    before it runs (OutOfResources), and the kernel runs, from then on, at one stage (only its reductions' few KB)."""
    key = (kernel, launch, logits.device.index)
    stages = 1 if key in _ONE_STAGE else launch.stages
    try:
        kernel[(logits.shape[0],)](*args, **kwargs, BLOCK=launch.block, STAGES=stages, num_warps=launch.warps)
    except OutOfResources:
        if stages == 1:
            raise
        _ONE_STAGE.add(key)
        kernel[(logits.shape[0],)](*args, **kwargs, BLOCK=launch.block, STAGES=1, num_warps=launch.warps)


def stats_launch(divergence: Divergence | None) -> Launch:
    """The statistics kernel's launch for ``divergence``: :data:`STATS_LAUNCH` where it reads the row once
    (none, fkl, rkl), :data:`TWO_PASS_STATS_LAUNCH` where twice."""
    return STATS_LAUNCH if divergence_code(divergence)[0] <= RKL else TWO_PASS_STATS_LAUNCH


def chunk_stats(
    logits: torch.Tensor,
    target_logits: torch.Tensor | None,
    vocab_size: int,
    token_ids: torch.Tensor | None,
    entropy: bool,
    divergence: Divergence | None,
    temperature: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Per-row ``[6, c]`` fp32: the log-partitions, log-prob, entropy, divergence and ``S`` (:data:`STAT_ROWS`),
    written into ``out`` (any ``[6, c]`` fp32 view with unit column stride: the sweep passes the chunk's columns
    of its ``[6, N]`` buffer, so the per-token outputs need no copy) and returned.

    ``logits`` ``[c, V]`` fp32 with unit column stride; ``target_logits``
    ``[c, Vₜ]`` (any float dtype, unit column stride) is read over its first
    ``min(Vₜ, V)`` columns, columns past ``Vₜ`` count as ``−inf`` (padding).
    """
    rows = logits.shape[0]
    if rows:
        head, params = _row_args(logits, target_logits, vocab_size, token_ids, divergence)
        _launch(_stats_kernel, stats_launch(divergence), logits, *head, out, out.stride(0), vocab_size,
                1.0 / temperature, **params, WANT_ENT=entropy)
    return out


def chunk_grad(
    logits: torch.Tensor,
    target_logits: torch.Tensor | None,
    vocab_size: int,
    token_ids: torch.Tensor | None,
    entropy: bool,
    divergence: Divergence | None,
    temperature: float,
    stats: torch.Tensor,
    cotangents: torch.Tensor,
    out: torch.Tensor,
    rest: bool = False,
) -> torch.Tensor:
    """Write ``∂L/∂z`` ``[c, V]`` into ``out`` (which may be ``logits`` itself) and return it.

    ``cotangents`` ``[3, c]`` fp32 holds ``∂L/∂ log q(y)``, ``∂L/∂H`` and
    ``∂L/∂D`` per row (zeros for outputs the objective does not use).

    ``rest=True``: the gradient that flows through the rest of each row, the entries outside a top-k set,
    which ``logits`` holds as ``−inf`` (no target, no divergence).  With ``x = z/T``, ``q'`` the rest's
    distribution (``log q'_j = x_j − L``, ``L = log Σ_rest e^x``), ``H' = −Σ q' log q'`` — what
    :func:`chunk_stats` gives for these logits, in ``stats``'s rows 0 and 3 — and ``cotangents`` ``[4, c]``
    holding ``∂L/∂x_y`` (the given token's logit), ``∂L/∂H'``, 0 and ``∂L/∂L``:

    ``∂L/∂z_j = (1/T) [∂L/∂L · q'_j − ∂L/∂H' · q'_j (log q'_j + H') + ∂L/∂x_y · δ_{j,y}]``

    (``∂L/∂x_j = q'_j``, ``∂H'/∂x_j = −q'_j (log q'_j + H')``): zero at the ``−inf`` entries but for the
    ``δ_{j,y}`` term; the caller writes the top-k entries over them.
    """
    rows = logits.shape[0]
    if rows:
        head, params = _row_args(logits, target_logits, vocab_size, token_ids, divergence)
        _launch(_grad_kernel, GRAD_LAUNCH, logits, *head, stats, stats.stride(0), cotangents, out, out.stride(0),
                rows, vocab_size, 1.0 / temperature, **params, WANT_ENT=entropy, REST=rest)
    return out
