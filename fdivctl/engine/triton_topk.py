"""Triton kernel for the logit store's top-k summary of a chunk of logits ``z [c, V]`` (no gradients).

``torch.topk`` over a 152k-wide fp32 row, then a scatter and ``logsumexp`` for
the tail, cost ~7× the head's matmul on an H100 (measured, 2048 rows, k = 64).
One pass over each row replaces them, :func:`_summary_kernel`:

* a threshold ``τ`` that at least k entries of the row reach (the k-th largest
  of a strided sample of the row: those k sample entries are in the row)
  splits off the candidates ``z_j ≥ τ``; the kernel compacts their values and
  ids into a ``[c, K_max]`` buffer (the prefix sum and the stores run only in
  the blocks that hold a candidate: ~0.2·k of a block's 2048 entries are
  one at V = 151936 when the row's order is random, so this skips blocks for
  small k or for rows whose likely ids cluster).  ``torch.topk`` then
  runs on that narrow buffer.  A row with more than ``K_max`` candidates (a
  very flat row) is flagged, and the caller redoes it on the PyTorch path, so
  the result is always exact; flagging instead of redoing at once keeps the
  chunk free of host synchronisation;
* in the same pass, online max/sum at temperature T over the rest:
  ``m = max_j z_j/T`` and ``S_τ = Σ_{z_j < τ} e^{z_j/T − m}``, reduced over
  each block (:func:`raise_max`).  Keeping them per lane and merging after the
  loop instead, as the engine's statistics kernel does
  (:func:`~fdivctl.engine.triton_chunk.lane_step`), made this kernel slower:
  on an H200, 36.6 / 38.0 / 43.3 ms per 16384 rows at k = 16 / 64 / 256
  against 31.0 / 32.3 / 37.5 ms for this form, in one run
  (``bench/results/row_kernels_cuda_h200.txt``).

The entries at or above ``τ`` are all in the buffer, and so is every entry at
or above the k-th largest value ``θ`` (``θ ≥ τ``), so the partition function
and the log tail mass over the ids not selected follow from ``S_τ`` and the
buffer (:func:`chunk_summary`): ``S = S_τ + Σ_{buffer} e^{z/T − m}``, and
``log(S_τ + Σ_{buffer, z < θ} e^{z/T − m} + (n_{=θ} − s_{=θ}) e^{θ/T − m}) − log S``,
``n_{=θ}`` the row's entries equal to ``θ`` and ``s_{=θ}`` those of them in the
top-k: exact, no ``1 − Σ p`` cancellation, no ``[c, V]`` scatter copy, and the
row is read once (a second tail pass over it read all of it again).

Values equal ``torch.topk``'s; among exactly tied logits the ids chosen may
differ (either is a correct top-k).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048
SAMPLE_STRIDE = 16


@triton.jit
def raise_max(m, x):
    """One block ``x`` of an online softmax: the running maximum ``m'`` after it, the shift its terms take
    (``m'``, or 0 while every entry so far is −inf: no −inf − (−inf)) and ``e^{m − shift}``, the factor that
    rescales the sums kept against ``m``."""
    m_new = tl.maximum(m, tl.max(x, 0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, shift, tl.exp(m - shift)


@triton.jit
def _summary_kernel(z_ptr, z_stride, thr_ptr, val_ptr, idx_ptr, count_ptr, stats_ptr, n_rows, n_cols, inv_t,
                    K_MAX: tl.constexpr, BLOCK: tl.constexpr):
    """Per row: the candidates ``z ≥ τ`` compacted (values, ids, how many), and m, S_τ of the module doc."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    thr = tl.load(thr_ptr + row)
    base = 0
    m = float("-inf")
    s_below = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < n_cols
        z = tl.load(z_row + cols, mask=inside, other=float("-inf"))
        x = z * inv_t
        m_new, safe, scale = raise_max(m, x)
        e = tl.exp(x - safe)
        keep = (z >= thr) & inside
        s_below = s_below * scale + tl.sum(tl.where(keep, 0.0, e), 0)
        m = m_new
        found = tl.sum(keep.to(tl.int32), 0)
        if found > 0:
            pos = base + tl.cumsum(keep.to(tl.int32), 0) - 1
            ok = keep & (pos < K_MAX)
            tl.store(val_ptr + row * K_MAX + pos, z, mask=ok)
            tl.store(idx_ptr + row * K_MAX + pos, cols, mask=ok)
        base += found
    tl.store(count_ptr + row, base)
    tl.store(stats_ptr + row, m)
    tl.store(stats_ptr + n_rows + row, s_below)


def _candidate_width(k: int) -> int:
    return triton.next_power_of_2(max(1024, 32 * k))


def chunk_summary(
    logits: torch.Tensor, k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For fp32 ``[c, V]`` logits with unit column stride: ``torch.topk(logits, k)`` (values at temperature 1,
    int64 ids), ``log Z`` and the log tail mass per row at ``temperature``, and the rows (bool ``[c]``) whose
    results are not exact: more candidates than the buffer holds.  No host synchronisation."""
    rows, vocab = logits.shape
    width = _candidate_width(k)
    if width >= vocab:  # the whole row fits the buffer: every entry is a candidate
        width = vocab
        threshold = torch.full((rows,), float("-inf"), dtype=logits.dtype, device=logits.device)
    else:
        stride = max(1, min(SAMPLE_STRIDE, vocab // (4 * k)))
        threshold = logits[:, ::stride].topk(k, dim=-1).values[:, -1].contiguous()
    values = torch.full((rows, width), float("-inf"), dtype=logits.dtype, device=logits.device)
    ids = torch.zeros(rows, width, dtype=torch.int32, device=logits.device)
    counts = torch.empty(rows, dtype=torch.int32, device=logits.device)
    stats = torch.empty(2, rows, dtype=torch.float32, device=logits.device)
    if rows:
        _summary_kernel[(rows,)](logits, logits.stride(0), threshold, values, ids, counts, stats, rows, vocab,
                                 1.0 / temperature, K_MAX=width, BLOCK=BLOCK, num_warps=8)
    top, pos = values.topk(k, dim=-1)
    m, s_below = stats
    kth = top[:, -1:]
    shifted = values.div(temperature).sub_(m.unsqueeze(-1)).exp_()  # the buffer's −inf padding gives 0
    s_all = s_below + shifted.sum(-1)
    s_less = s_below + torch.where(values < kth, shifted, 0.0).sum(-1)
    tied_out = (values == kth).sum(-1) - (top == kth).sum(-1)  # entries equal to θ left out of the top-k
    rest = s_less + tied_out.to(torch.float32) * torch.exp(kth.squeeze(-1) / temperature - m)
    log_z = m + torch.log(s_all)
    return top, ids.gather(-1, pos).long(), log_z, m + torch.log(rest) - log_z, counts > width
