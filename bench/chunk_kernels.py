"""The engine's two Triton row kernels alone on one chunk, each against the bytes it must move: how near HBM's
bandwidth each runs.

A chunk of the sweep (:mod:`fdivctl.engine.sweep`) runs, after its logits GEMMs, the statistics kernel
(``chunk_stats``: log-partitions, log-prob, entropy, divergence) and the gradient kernel (``chunk_grad``:
``∂L/∂z`` in bf16).  Both are bound by memory, so their time is the bytes they must move over the bandwidth they
reach.  On one chunk of fp32 student logits ``[rows, V]`` and fp32 target logits, for each divergence, this
times both (median of ``--repeats`` after a warm-up) and prints one JSON object per divergence with ``stats_ms``,
``grad_ms``, the bytes each must move (``*_bytes``: one read of ``z`` and ``t`` per pass, the one-pass
statistics of none / fkl / rkl, two for the others; the gradient reads both once and writes bf16) and
``*_gb_per_s``, and ``stats_vs_grad_bandwidth`` (the first ÷ the second: below 1, the statistics kernel reaches
less of the bandwidth than the gradient kernel, which reduces nothing in its loop).  ``torch_row_sum_gb_per_s`` is
``torch.sum(z, dim=1)``'s read bandwidth on the same rows in the same run, and ``stats_vs_row_sum_bandwidth`` the
statistics kernel's over it: how near a plain row reduction of the chip it reads.

On an H100 the rkl ``full`` step's profile gave 305 µs per 384-row chunk for the statistics (466 MB: 1.5 TB/s)
and 209 µs for the gradient (583 MB: 2.8 TB/s), before the statistics kept their sums per lane
(``bench/results/train_step_cuda_h100_profile.txt``); this measures the same chunk.  On an H200 the per-lane
statistics took 245 µs for rkl (1.9 TB/s), against 326 µs for the per-block code in the same run
(``bench/results/row_kernels_cuda_h200.txt``).

``--launches`` times the kernels at other launch settings (:class:`fdivctl.engine.triton_chunk.Launch`: block,
warps, software-pipelining stages), one ``STATS/GRAD`` pair per record, each ``BLOCKxWARPSxSTAGES`` (STATS for the
one- and the two-pass statistics alike); the records carry ``stats_launch`` and ``grad_launch``, and
``stats_max_diff`` / ``grad_max_diff``, the largest difference from the first pair's outputs (same inputs: only the
summation order may differ).  A pair that does not compile or run is printed with its ``error``.

    python bench/chunk_kernels.py --quick          # CPU, Triton's interpreter, a small chunk (the harness only)
    python bench/chunk_kernels.py --device cuda    # 384 rows × V = 151936 (the default chunk there)
    python bench/chunk_kernels.py --device cuda --launches 2048x16x1/4096x16x1 2048x16x3/4096x16x3
"""

from __future__ import annotations

import argparse
import itertools
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=384, help="rows of the chunk (the CUDA default at V = 151936)")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--divergences", default="none,rkl,fkl,jsd", help="comma-separated registry names, or none")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="a small chunk under Triton's CPU interpreter")
    parser.add_argument("--launches", nargs="*", default=None,
                        help="STATS/GRAD launch pairs, each BLOCKxWARPSxSTAGES (default: the engine's own)")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.vocab, args.repeats = 8, 4096, 3
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    import torch

    from fdivctl import divergences
    from fdivctl.engine import triton_chunk
    from profiling import median_ms  # bench/profiling.py, beside this script

    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(args.rows, args.vocab, generator=g, device=device) * 3
    t = z + torch.randn(args.rows, args.vocab, generator=g, device=device)
    ids = torch.randint(0, args.vocab, (args.rows,), generator=g, device=device)
    cotangents = torch.randn(3, args.rows, generator=g, device=device)
    stats = torch.empty(len(triton_chunk.STAT_ROWS), args.rows, device=device)
    grad = torch.empty(args.rows, args.vocab, dtype=torch.bfloat16, device=device)
    row_bytes = args.rows * args.vocab * 4  # one fp32 [rows, V] tensor
    # the chip's read bandwidth on the same rows, by PyTorch's own row reduction: the bar for both kernels
    read_gb_per_s = row_bytes / median_ms(lambda: torch.sum(z, dim=1), device, args.repeats) / 1e6
    # None: the engine's own launches (the statistics' by divergence, triton_chunk.stats_launch)
    launches = [_launch_pair(text, triton_chunk.Launch) for text in args.launches] if args.launches else [None]
    reference = {}  # divergence → the first launch's statistics and gradient
    for pair, name in itertools.product(launches, args.divergences.split(",")):
        if pair is not None:  # both statistics launches (one- and two-pass) and the gradient's
            triton_chunk.STATS_LAUNCH, triton_chunk.GRAD_LAUNCH = pair
            triton_chunk.TWO_PASS_STATS_LAUNCH = pair[0]
        divergence = None if name == "none" else divergences.get(name)
        head = {
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
            "divergence": name, "rows": args.rows, "vocab": args.vocab,
            "stats_launch": triton_chunk.stats_launch(divergence)._asdict(),
            "grad_launch": triton_chunk.GRAD_LAUNCH._asdict(),
        }
        target = None if divergence is None else t
        kernel_args = (z, target, args.vocab, ids, True, divergence, 1.0)
        passes = 1 if triton_chunk.divergence_code(divergence)[0] <= triton_chunk.RKL else 2  # _stats_kernel's
        stats_bytes = passes * row_bytes * (1 if target is None else 2)
        grad_bytes = row_bytes * (1 if target is None else 2) + args.rows * args.vocab * 2
        try:
            stats_ms = median_ms(lambda a=kernel_args: triton_chunk.chunk_stats(*a, out=stats), device,
                                 args.repeats)
            grad_ms = median_ms(lambda a=kernel_args: triton_chunk.chunk_grad(*a, stats, cotangents, grad), device,
                                args.repeats)
        except Exception as error:  # a launch the compiler or the chip refuses: the sweep goes on
            print(json.dumps({**head, "error": f"{type(error).__name__}: {error}"[:500]}), flush=True)
            continue
        # every launch must give the first one's outputs: the largest difference from them, 0 for the first
        first = reference.setdefault(name, (stats.clone(), grad.clone()))
        record = {
            **head,
            "stats_max_diff": (stats - first[0]).abs().max().item(),
            "grad_max_diff": (grad.float() - first[1].float()).abs().max().item(),
            "stats_ms": stats_ms, "stats_bytes": stats_bytes, "stats_gb_per_s": stats_bytes / stats_ms / 1e6,
            "grad_ms": grad_ms, "grad_bytes": grad_bytes, "grad_gb_per_s": grad_bytes / grad_ms / 1e6,
        }
        record["stats_vs_grad_bandwidth"] = record["stats_gb_per_s"] / record["grad_gb_per_s"]
        record["torch_row_sum_gb_per_s"] = read_gb_per_s
        record["stats_vs_row_sum_bandwidth"] = record["stats_gb_per_s"] / read_gb_per_s
        print(json.dumps(record), flush=True)


def _launch_pair(text: str, launch: type) -> tuple:
    """``"2048x16x1/4096x16x2"`` → (stats launch, grad launch)."""
    try:
        stats, grad = (launch(*(int(n) for n in part.split("x"))) for part in text.split("/"))
        return stats, grad
    except (TypeError, ValueError):
        raise SystemExit(f"--launches: {text!r} is not STATS/GRAD, each BLOCKxWARPSxSTAGES") from None


if __name__ == "__main__":
    main()
