"""A chunk's logits GEMM with the log-partition in its epilogue: ``z = h Wᵀ`` in fp32 and
``log Z = log Σ_j e^{z_j / T}`` per row, from one pass over the operands.

The engine's row kernels (:mod:`fdivctl.engine.triton_chunk`) need ``log Z`` of the student (and of a teacher
head's) logits before any normalized log-prob: with cuBLAS's GEMM that costs a read of the fp32 ``[c, V]`` logits
of its own (the statistics pass), 8 of the 26 bytes per vocabulary entry a jsd chunk moves.  Here each output
tile's epilogue writes, per row, ``m = max_j x_j`` and ``s = Σ_j e^{x_j − m}`` over its ``BLOCK_N`` columns
(``x = z/T``): the online-softmax state of Milakov & Gimelshein ("Online normalizer calculation for softmax",
2018, Alg. 3), merged over the ``⌈V / BLOCK_N⌉`` tiles as ``log Z = M + log Σ_tiles s·e^{m − M}``, ``M = max m``.

Two kernels sharing the tile order and the epilogue:

* ``pointer`` — one ``[BLOCK_M, BLOCK_N]`` tile per program, operands loaded through pointers (any GPU);
* ``tma`` — one persistent program per multiprocessor walking the tiles, operands loaded through host-made tensor
  descriptors (Hopper's bulk-copy engine, sm90+).

``bench/logits_epilogue.py`` times each launch of :data:`CANDIDATES` against cuBLAS's GEMM alone and against
cuBLAS's GEMM plus the statistics pass it would save.  Measured on an H200 (2026-11-27,
``bench/results/row_kernels_cuda_h200_epilogue.txt``): the fastest launch ran at 0.70–0.75 of cuBLAS's rate and
0.81–0.89 of cuBLAS plus the statistics pass, and the engine built on it (each chunk's and the teacher's logits
from this GEMM, the row kernels skipping the pass it saves) ran 0.89–0.98× the cuBLAS path's speed at every
benchmark shape (``bench/results/loss_engine_cuda_h200_epilogue.jsonl``), so the engine keeps cuBLAS and this
stays a benchmark.  Runs on CUDA; on the CPU only under Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fdivctl.engine.triton_topk import raise_max


class GemmConfig(NamedTuple):
    """A launch of the GEMM: output tile ``block_m × block_n``, ``block_k`` of the inner dimension per step,
    ``group_m`` row blocks per group of consecutive tiles (they share the weight's columns in L2), ``warps`` per
    program and ``stages`` of software pipelining of the operand loads."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    warps: int
    stages: int


#: the launches timed on CUDA: tiles around the Hopper bf16 one of Triton's matmul tutorials (128 × 256 × 64,
#: 8 warps, 3 stages), ``tma`` only on compute capability 9 and up.  The ``tma`` kernel stages its fp32 output tile
#: in shared memory: at 128 × 256 × 64 (three or four stages) and 128 × 128 × 128 (three) it asked for 262–328 KB,
#: over the 227 KB a program may have on an H100 or H200, so those are not tried
CANDIDATES = (
    ("tma", GemmConfig(128, 128, 64, 8, 8, 4)),
    ("pointer", GemmConfig(128, 256, 64, 8, 8, 3)),
    ("pointer", GemmConfig(128, 128, 64, 8, 8, 4)),
    ("pointer", GemmConfig(256, 128, 64, 8, 8, 3)),
)
#: rows per program and tiles per step of the kernel that merges the tiles' row statistics
MERGE_ROWS, MERGE_TILES = 32, 64


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
    columns (``x = z · inv_t``; a row of −inf only gives −inf and 0, no −inf − (−inf))."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(z_ptr + rows[:, None].to(tl.int64) * stride_z + cols[None, :], acc, mask=inside)
    x = tl.where(cols[None, :] < N, acc * inv_t, float("-inf"))
    top = tl.max(x, 1)
    shift = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.exp(x - shift[:, None]), 1)
    tl.store(part_ptr + pid_n * M + rows, top, mask=rows < M)
    tl.store(part_ptr + part_stride + pid_n * M + rows, total, mask=rows < M)


@triton.jit
def _pointer_kernel(h_ptr, w_ptr, stride_h, stride_w, z_ptr, part_ptr, M, N, K, stride_z, part_stride,
                    inv_t, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
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
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    _epilogue(acc, pid_m, pid_n, z_ptr, part_ptr, M, N, stride_z, part_stride, inv_t, BLOCK_M, BLOCK_N)


@triton.jit
def _tma_kernel(h_desc, w_desc, z_ptr, part_ptr, M, N, K, stride_z, part_stride, inv_t,
                IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr):
    """The same tiles, ``PROGRAMS`` persistent programs each taking every ``PROGRAMS``-th, the operand blocks
    loaded through tensor descriptors (out-of-range rows and columns read as zeros)."""
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for index in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=True):
        pid_m, pid_n = _tile(index, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            a = h_desc.load([pid_m * BLOCK_M, start])
            b = w_desc.load([pid_n * BLOCK_N, start])
            if IEEE:
                acc = tl.dot(a, b.T, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b.T, acc)
        _epilogue(acc, pid_m, pid_n, z_ptr, part_ptr, M, N, stride_z, part_stride, inv_t, BLOCK_M, BLOCK_N)


@triton.jit
def _merge_kernel(part_ptr, part_stride, tiles, m, out_ptr, BLOCK_TILES: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """``log Z = M + log Σ_tiles s·e^{m − M}`` for ``BLOCK_ROWS`` rows per program, over the tiles' ``(m, s)`` of
    ``part`` ``[2, tiles, rows]`` in blocks of ``BLOCK_TILES``, the running maximum rescaling the sum so far
    (:func:`~fdivctl.engine.triton_topk.raise_max`; a row with no finite entry gives −inf, no −inf − (−inf))."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    top = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_ROWS], tl.float32)
    for start in range(0, tiles, BLOCK_TILES):
        index = start + tl.arange(0, BLOCK_TILES)
        where = index[:, None] * m + rows[None, :]
        inside = (index[:, None] < tiles) & (rows[None, :] < m)
        tile_top = tl.load(part_ptr + where, mask=inside, other=float("-inf"))
        tile_sum = tl.load(part_ptr + part_stride + where, mask=inside, other=0.0)
        top, shift, scale = raise_max(top, tile_top)
        total = total * scale + tl.sum(tile_sum * tl.exp(tile_top - shift[None, :]), 0)
    shift = tl.where(top == float("-inf"), 0.0, top)
    total = tl.where(rows < m, total, 1.0)  # rows past the last: no log 0 computed for nothing
    tl.store(out_ptr + rows, shift + tl.log(total), mask=rows < m)


def _descriptor_ok(tensor: torch.Tensor) -> bool:
    """Whether a tensor descriptor can address ``tensor``: its start and row stride 16-byte aligned (a hidden size
    that is a multiple of 8 in bf16), as the bulk-copy engine needs; else the ``pointer`` kernel runs."""
    return tensor.data_ptr() % 16 == 0 and tensor.stride(0) * tensor.element_size() % 16 == 0


def logits_with_lse(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    temperature: float,
    launch: tuple[str, GemmConfig],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z = hidden @ weightᵀ`` fp32 ``[M, V]``, ``log Σ_j e^{z_j / temperature}`` fp32 ``[M]``), the
    GEMM accumulating in fp32 (fp32 operands multiply in IEEE fp32, not TF32).  ``hidden`` ``[M, K]`` and
    ``weight`` ``[V, K]`` in one dtype with unit column stride.  ``launch``: ``(kernel, config)``, ``kernel``
    ``"pointer"`` or ``"tma"`` (``tma`` falls back to ``pointer`` for operands it cannot address): the GEMM, then
    one small kernel merging its tiles' row statistics."""
    x = hidden.to(weight.dtype)
    if x.stride(-1) != 1:
        x = x.contiguous()
    kernel, (block_m, block_n, block_k, group_m, warps, stages) = launch
    if kernel == "tma" and not (_descriptor_ok(x) and _descriptor_ok(weight)):
        kernel = "pointer"
    (m, k), n = x.shape, weight.shape[0]
    tiles_n = triton.cdiv(n, block_n)
    tiles = triton.cdiv(m, block_m) * tiles_n
    logits = torch.empty(m, n, dtype=torch.float32, device=x.device)
    part = torch.empty(2, tiles_n, m, dtype=torch.float32, device=x.device)  # per tile and row: max, Σ e^{x − max}
    tail = (logits, part, m, n, k, logits.stride(0), part.stride(0), 1.0 / temperature)
    meta = {"IEEE": weight.dtype == torch.float32, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
            "GROUP_M": group_m, "num_warps": warps, "num_stages": stages}
    if m:
        if kernel == "pointer":
            _pointer_kernel[(tiles,)](x, weight, x.stride(0), weight.stride(0), *tail, **meta)
        else:
            from triton.tools.tensor_descriptor import TensorDescriptor

            programs = tiles if x.device.type != "cuda" else min(
                tiles, torch.cuda.get_device_properties(x.device).multi_processor_count)
            _tma_kernel[(programs,)](TensorDescriptor.from_tensor(x, [block_m, block_k]),
                                     TensorDescriptor.from_tensor(weight, [block_n, block_k]), *tail,
                                     PROGRAMS=programs, **meta)
    lse = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        _merge_kernel[(triton.cdiv(m, MERGE_ROWS),)](part, part.stride(0), tiles_n, m, lse, BLOCK_TILES=MERGE_TILES,
                                                     BLOCK_ROWS=MERGE_ROWS)
    return logits, lse
