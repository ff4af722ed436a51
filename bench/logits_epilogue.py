"""Can a Triton logits GEMM that also emits each row's softmax statistics keep up with cuBLAS?  The measurement
that decides whether the loss engine's statistics pass can go.

Each chunk of the engine's sweep (:mod:`fdivctl.engine.sweep`) computes fp32 logits ``z = h Wᵀ`` with cuBLAS
(:func:`fdivctl.engine.matmul.linear_fp32`), then a row kernel reads ``z`` (and a dense target's logits) once to
get the log-partitions ``log Z = log Σ_j e^{z_j/T}`` (:func:`fdivctl.engine.triton_chunk.chunk_stats`), and a
second writes the gradient.  On an H100 at H = 2048, V = 151936 that first read is ~0.2 ms of a ~2.1 ms chunk
(``bench/results/row_kernels_launches_cuda_h100.txt``) and bounds the whole step near 0.6 of the chip's matmul
rate (README, "Loss engine").  If the logits GEMM wrote, beside ``z``, each output tile's row maximum ``m`` and
``s = Σ e^{z/T − m}`` over its columns — the online-softmax state of Milakov & Gimelshein ("Online normalizer
calculation for softmax", 2018), merged over the tiles as ``log Z = M + log Σ_tiles s·e^{m − M}`` — the fkl and
no-divergence chunks would need one read of ``z`` instead of two, and jsd two instead of three.

This times, at the engine's chunk shapes (bf16 operands, fp32 logits): ``cublas_ms`` (the engine's logits GEMM),
``cublas_stats_ms`` (it and the engine's statistics kernel without a divergence, the read the epilogue would
replace), and ``epilogue_ms`` (the Triton GEMM below with the statistics in its epilogue, each of its launch
configurations; the best is reported, ``epilogue_config`` says which).  ``epilogue_vs_cublas`` =
``cublas_ms / epilogue_ms`` (≥ 1: the Triton GEMM is as fast as cuBLAS) and ``epilogue_vs_cublas_stats`` =
``cublas_stats_ms / epilogue_ms`` (> 1: dropping the pass would pay).  Before timing, the epilogue's logits and
log-partitions are checked against cuBLAS's and ``torch.logsumexp`` (``max_logit_diff``, ``max_lse_diff``: the
largest over every configuration).  Two kernels (``bench/logits_epilogue_kernels.py``): ``pointer`` (a tile per
program, loads through pointers) and ``tma`` (persistent programs, loads through tensor descriptors, Hopper's bulk
copy engine); ``pointer_ms`` / ``tma_ms`` are each one's fastest configuration.

Measured on an H200 (2026-11-27, ``bench/results/row_kernels_cuda_h200_epilogue.txt``): ``epilogue_vs_cublas``
0.70–0.75 and ``epilogue_vs_cublas_stats`` 0.81–0.89 at the four shapes.  The engine, built once on this GEMM and
timed end to end, ran 0.89–0.98× as fast as with cuBLAS (``bench/results/loss_engine_cuda_h200_epilogue.jsonl``), so
it keeps cuBLAS's GEMM and the statistics pass; this bench stays to time a faster GEMM against that bar.

    python bench/logits_epilogue.py --quick           # CPU, Triton's interpreter, fp32, small shapes (the harness)
    python bench/logits_epilogue.py --device cuda     # rows 384 / 768 × H 2048 / 4096 × V 151936, bf16
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

#: the launches tried under the interpreter (on CUDA: logits_epilogue_kernels.CANDIDATES)
QUICK_CONFIGS = [("pointer", (16, 32, 16, 2, 4, 2)), ("tma", (16, 32, 16, 2, 4, 2))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (Triton's interpreter: the harness only) or cuda")
    parser.add_argument("--rows", default="384,768", help="rows of a chunk (comma-separated)")
    parser.add_argument("--hidden", default="2048,4096", help="hidden sizes (comma-separated)")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary size (the GEMM's columns)")
    parser.add_argument("--temperature", type=float, default=1.0, help="T of log Σ e^{z/T}")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per variant (median)")
    parser.add_argument("--quick", action="store_true", help="small fp32 shapes under Triton's CPU interpreter")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.hidden, args.vocab, args.repeats = "24", "32", 200, 2
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    import torch

    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    generator = torch.Generator(device=device).manual_seed(0)
    for rows, hidden_size in itertools.product(_ints(args.rows), _ints(args.hidden)):
        h = torch.randn(rows, hidden_size, generator=generator, device=device).to(dtype)
        w = (torch.randn(args.vocab, hidden_size, generator=generator, device=device) / hidden_size**0.5).to(dtype)
        record = measure(h, w, args.temperature, args.repeats, QUICK_CONFIGS if args.quick else None)
        if record is not None:
            print(json.dumps(record), flush=True)


def measure(h, w, temperature: float, repeats: int, configs: list[tuple] | None) -> dict | None:
    """One shape's record (None when no configuration ran); a configuration that fails is printed and skipped.
    ``epilogue_*`` describe the fastest configuration; ``{kernel}_ms`` the fastest of each kernel.  ``configs``:
    ``(kernel, (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages))`` pairs; None: ``CANDIDATES``."""
    import torch

    from fdivctl.engine import triton_chunk
    from fdivctl.engine.matmul import linear_fp32
    from logits_epilogue_kernels import CANDIDATES, GemmConfig, logits_with_lse  # beside this script
    from profiling import median_ms  # bench/profiling.py, beside this script

    (rows, hidden_size), vocab, device = h.shape, w.shape[0], h.device
    stats = torch.empty(len(triton_chunk.STAT_ROWS), rows, device=device)
    reference = linear_fp32(h, w)
    reference_lse = torch.logsumexp(reference / temperature, dim=-1)

    def cublas_stats():
        triton_chunk.chunk_stats(linear_fp32(h, w), None, vocab, None, False, None, temperature, out=stats)

    record = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
        "rows": rows, "hidden": hidden_size, "vocab": vocab, "dtype": str(h.dtype).removeprefix("torch."),
        "flops": 2 * rows * hidden_size * vocab,
        "cublas_ms": median_ms(lambda: linear_fp32(h, w), device, repeats),
        "cublas_stats_ms": median_ms(cublas_stats, device, repeats),
    }
    best, diffs = None, {"logit": 0.0, "lse": 0.0}
    for kernel, config in CANDIDATES if configs is None else configs:
        launch = (kernel, GemmConfig(*config))
        try:
            logits, lse = logits_with_lse(h, w, temperature, launch)
            ms = median_ms(lambda launch=launch: logits_with_lse(h, w, temperature, launch), device, repeats)
        except Exception as error:  # a configuration the compiler or the chip refuses: the others go on
            print(json.dumps({**record, "kernel": kernel, "config": config,
                              "error": f"{type(error).__name__}: {error}"[:400]}), flush=True)
            continue
        record[f"{kernel}_ms"] = min(ms, record.get(f"{kernel}_ms", ms))
        # every configuration's outputs are checked, not only the fastest's: the largest differences are kept
        diffs["logit"] = max(diffs["logit"], (logits - reference).abs().max().item())
        diffs["lse"] = max(diffs["lse"], (lse - reference_lse).abs().max().item())
        if best is None or ms < best[0]:
            best = (ms, kernel, config)
    if best is None:
        return None
    ms, kernel, config = best
    return {
        **record,
        "epilogue_ms": ms, "epilogue_kernel": kernel, "epilogue_config": config, "max_logit_diff": diffs["logit"],
        "max_lse_diff": diffs["lse"], "cublas_tflops": record["flops"] / record["cublas_ms"] / 1e9,
        "epilogue_tflops": record["flops"] / ms / 1e9, "epilogue_vs_cublas": record["cublas_ms"] / ms,
        "epilogue_vs_cublas_stats": record["cublas_stats_ms"] / ms,
    }


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


if __name__ == "__main__":
    main()
