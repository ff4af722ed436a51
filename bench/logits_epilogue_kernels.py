"""The Triton kernels of ``bench/logits_epilogue.py``: a logits GEMM ``z = h Wᵀ`` (fp32 accumulation and output)
whose epilogue also writes, per output tile and row, ``max_j x_j`` and ``Σ_j e^{x_j − max}`` over the tile's columns
(``x = z · inv_t``): the online-softmax state of Milakov & Gimelshein ("Online normalizer calculation for softmax",
2018), which the caller merges over the tiles into ``log Σ_j e^{x_j}``.  A module of its own so that the bench can
set ``TRITON_INTERPRET`` before it is imported."""

import triton
import triton.language as tl


@triton.jit
def _tile(index, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile ``index``'s (row block, column block), taken in groups of ``GROUP_M`` row blocks so that
    consecutive tiles share the weight's columns in L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    in_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (index // in_group) * GROUP_M
    size_m = min(tiles_m - first_m, GROUP_M)
    return first_m + (index % in_group) % size_m, (index % in_group) // size_m


@triton.jit
def _epilogue(acc, pid_m, pid_n, z_ptr, part_ptr, M, N, stride_z, part_stride, inv_t,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store the fp32 tile ``acc`` of ``z``, and per row ``max_j x_j`` and ``Σ_j e^{x_j − max}`` over its
    columns (``x = z · inv_t``)."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(z_ptr + rows[:, None].to(tl.int64) * stride_z + cols[None, :], acc, mask=inside)
    x = tl.where(cols[None, :] < N, acc * inv_t, float("-inf"))
    top = tl.max(x, 1)
    total = tl.sum(tl.exp(x - top[:, None]), 1)
    tl.store(part_ptr + pid_n * M + rows, top, mask=rows < M)
    tl.store(part_ptr + part_stride + pid_n * M + rows, total, mask=rows < M)


@triton.jit
def pointer_kernel(h_ptr, w_ptr, stride_h, stride_w, z_ptr, part_ptr, M, N, K, stride_z, part_stride, inv_t,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One ``[BLOCK_M, BLOCK_N]`` tile of ``z = h Wᵀ`` per program (fp32 accumulation), then the epilogue."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        a = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + (start + ks)[None, :],
                    mask=(rows[:, None] < M) & ((start + ks)[None, :] < K), other=0.0)
        b = tl.load(w_ptr + cols[None, :].to(tl.int64) * stride_w + (start + ks)[:, None],
                    mask=(cols[None, :] < N) & ((start + ks)[:, None] < K), other=0.0)
        acc = tl.dot(a, b, acc)
    _epilogue(acc, pid_m, pid_n, z_ptr, part_ptr, M, N, stride_z, part_stride, inv_t, BLOCK_M, BLOCK_N)


@triton.jit
def tma_kernel(h_desc, w_desc, z_ptr, part_ptr, M, N, K, stride_z, part_stride, inv_t,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                PROGRAMS: tl.constexpr):
    """The same tiles, ``PROGRAMS`` persistent programs each taking every ``PROGRAMS``-th, the operand blocks
    loaded through tensor descriptors (out-of-range rows and columns read as zeros)."""
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for index in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=True):
        pid_m, pid_n = _tile(index, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            a = h_desc.load([pid_m * BLOCK_M, start])
            b = w_desc.load([pid_n * BLOCK_N, start])
            acc = tl.dot(a, b.T, acc)
        _epilogue(acc, pid_m, pid_n, z_ptr, part_ptr, M, N, stride_z, part_stride, inv_t, BLOCK_M, BLOCK_N)
