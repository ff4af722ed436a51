"""Triton kernels for the logit store's top-k summary of a chunk of logits ``z [c, V]`` (no gradients).

``torch.topk`` over a 152k-wide fp32 row, then a scatter and ``logsumexp`` for
the tail, cost ~7× the head's matmul on an H100 (measured, 2048 rows, k = 64).
Two kernels replace them:

* :func:`_candidates_kernel` — a threshold ``τ`` that at least k entries of
  the row reach (the k-th largest of a strided sample of the row: those k
  sample entries are in the row) splits off the candidates ``z_j ≥ τ``; the
  kernel compacts their values and ids into a ``[c, K_max]`` buffer in one
  pass.  ``torch.topk`` then runs on that narrow buffer.  A row with more than
  ``K_max`` candidates (a very flat row) is flagged, and the caller redoes it
  on the PyTorch path, so the result is always exact; flagging instead of
  redoing at once keeps the chunk free of host synchronisation.
* :func:`_tail_kernel` — one pass of online max/sum giving, at temperature T,
  ``log Z = log Σ_j exp(z_j/T)`` and the log tail mass over the ids not
  selected, ``log(Σ_{z_j < θ} e^{z_j/T} + (n_{=θ} − s_{=θ}) e^{θ/T}) − log Z``
  with ``θ`` the k-th largest value, ``n_{=θ}`` the row's entries equal to it
  and ``s_{=θ}`` those of them in the top-k: exact, no ``1 − Σ p`` cancellation,
  and no ``[c, V]`` scatter copy.

Values equal ``torch.topk``'s; among exactly tied logits the ids chosen may
differ (either is a correct top-k).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fdivctl.engine.triton_chunk import raise_max

BLOCK = 2048
SAMPLE_STRIDE = 16


@triton.jit
def _candidates_kernel(
    z_ptr, z_stride, thr_ptr, val_ptr, idx_ptr, count_ptr, n_cols, K_MAX: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    thr = tl.load(thr_ptr + row)
    base = 0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(z_row + cols, mask=cols < n_cols, other=float("-inf"))
        keep = z >= thr
        pos = base + tl.cumsum(keep.to(tl.int32), 0) - 1
        ok = keep & (pos < K_MAX)
        tl.store(val_ptr + row * K_MAX + pos, z, mask=ok)
        tl.store(idx_ptr + row * K_MAX + pos, cols, mask=ok)
        base += tl.sum(keep.to(tl.int32), 0)
    tl.store(count_ptr + row, base)


@triton.jit
def _tail_kernel(z_ptr, z_stride, kth_ptr, out_ptr, n_rows, n_cols, inv_t, BLOCK: tl.constexpr):
    """Per row: max m of z/T, Σ exp(z/T − m), Σ_{z < θ} exp(z/T − m), #{z = θ}."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    kth = tl.load(kth_ptr + row)
    m = float("-inf")
    s_all = 0.0
    s_less = 0.0
    n_eq = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(z_row + cols, mask=cols < n_cols, other=float("-inf"))
        x = z * inv_t
        m_new, safe, scale = raise_max(m, x)
        e = tl.exp(x - safe)
        s_all = s_all * scale + tl.sum(e, 0)
        s_less = s_less * scale + tl.sum(tl.where(z < kth, e, 0.0), 0)
        n_eq += tl.sum(tl.where(z == kth, 1.0, 0.0), 0)
        m = m_new
    tl.store(out_ptr + row, m)
    tl.store(out_ptr + n_rows + row, s_all)
    tl.store(out_ptr + 2 * n_rows + row, s_less)
    tl.store(out_ptr + 3 * n_rows + row, n_eq)


def _candidate_width(k: int) -> int:
    return triton.next_power_of_2(max(1024, 32 * k))


def chunk_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``torch.topk(logits, k)`` (values, int64 ids) for fp32 ``[c, V]`` logits with unit column stride, and the
    rows (bool ``[c]``, or None when none can be) whose values are not exact: more candidates than the buffer
    holds.  No host synchronisation."""
    rows, vocab = logits.shape
    stride = max(1, min(SAMPLE_STRIDE, vocab // (4 * k)))
    k_max = _candidate_width(k)
    if stride == 1 or k_max >= vocab or rows == 0:
        return *logits.topk(k, dim=-1), None
    threshold = logits[:, ::stride].topk(k, dim=-1).values[:, -1].contiguous()
    values = torch.full((rows, k_max), float("-inf"), dtype=logits.dtype, device=logits.device)
    ids = torch.zeros(rows, k_max, dtype=torch.int32, device=logits.device)
    counts = torch.empty(rows, dtype=torch.int32, device=logits.device)
    _candidates_kernel[(rows,)](
        logits, logits.stride(0), threshold, values, ids, counts, vocab, K_MAX=k_max, BLOCK=BLOCK, num_warps=8
    )
    top, pos = values.topk(k, dim=-1)
    return top, ids.gather(-1, pos).long(), counts > k_max


def chunk_log_partition(
    logits: torch.Tensor, top: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log Z, log tail)`` per row at ``temperature``, for the top-k values ``top`` of ``logits``."""
    rows, vocab = logits.shape
    kth = top[:, -1].contiguous()
    stats = torch.empty(4, rows, dtype=torch.float32, device=logits.device)
    if rows:
        _tail_kernel[(rows,)](logits, logits.stride(0), kth, stats, rows, vocab, 1.0 / temperature, BLOCK=BLOCK,
                              num_warps=8)
    m, s_all, s_less, n_eq = stats
    selected_eq = (top == kth.unsqueeze(-1)).sum(-1).to(torch.float32)
    rest = s_less + (n_eq - selected_eq) * torch.exp(kth / temperature - m)
    log_z = m + torch.log(s_all)
    return log_z, m + torch.log(rest) - log_z
