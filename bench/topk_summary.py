"""The logit store's top-k summary alone, beside the head matmul it follows, side by side in one run.

``teacher-logits`` spends its time beyond a bare forward in :func:`fdivctl.engine.topk.head_topk`: the head's
fp32 logits chunk by chunk, then the top-k ids and log-probs, the tail mass and the tokens' log-probs.  This
times, on the same ``[rows, H]`` hidden states and ``[V, H]`` head:

* ``matmul`` — the head alone, ``h Wᵀ`` in the weight's dtype (what a bare forward's ``lm_head`` does);
* ``summary_torch`` / ``summary_triton`` — ``head_topk`` with ``kernel="torch"`` / ``"triton"`` (CUDA, or
  Triton's interpreter), each warmed up once first so Triton's compile is not timed.

Prints one JSON object per k with each variant's median ms (``*_ms``), ``*_vs_matmul`` (its time ÷ the
matmul's) and ``triton_speedup`` (torch ÷ triton).  With ``--profile FILE``, the Triton summary's operators and
kernels (torch.profiler, by self device time) go to FILE: where the summary's own time goes.

    python bench/topk_summary.py --quick                               # CPU, torch path, small shapes
    python bench/topk_summary.py --device cuda --profile summary.txt   # 16384 rows, H 896, V 151936, bf16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fdivctl.engine.sweep import triton_runs_here
from fdivctl.engine.topk import head_topk
from profiling import median_ms, profile_table  # bench/profiling.py, beside this script

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small CPU shapes, a few seconds")
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default bf16 on cuda, fp32 on cpu")
    parser.add_argument("--ks", default="16,64,256")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", default=None, help="write the Triton summary's torch.profiler table (first k)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.quick:
        args.rows, args.hidden, args.vocab, args.repeats = 1024, 128, 16384, 3
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(args.rows, args.hidden, generator=g, device=device, dtype=dtype)
    weight = (torch.randn(args.vocab, args.hidden, generator=g, device=device) * args.hidden**-0.5).to(dtype)
    tokens = torch.randint(0, args.vocab, (args.rows,), generator=g, device=device)
    kernels = ["torch"] + (["triton"] if triton_runs_here(device) else [])
    profiles = []
    with torch.no_grad():
        matmul_ms = median_ms(lambda: hidden @ weight.T, device, args.repeats)
        for k in (int(x) for x in args.ks.split(",")):
            record = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
                      "rows": args.rows, "hidden": args.hidden, "vocab": args.vocab, "dtype": str(dtype), "k": k,
                      "matmul_ms": matmul_ms}
            for kernel in kernels:
                ms = median_ms(lambda kernel=kernel, k=k: head_topk(hidden, weight, k, tokens, kernel=kernel),
                                device, args.repeats)
                record[f"summary_{kernel}_ms"] = ms
                record[f"summary_{kernel}_vs_matmul"] = ms / matmul_ms
            if "triton" in kernels:
                record["triton_speedup"] = record["summary_torch_ms"] / record["summary_triton_ms"]
                if args.profile and not profiles:
                    profiles.append(f"== head_topk triton, k {k}, {args.rows} rows ==\n" + profile_table(
                        lambda k=k: head_topk(hidden, weight, k, tokens, kernel="triton"), device))
            print(json.dumps(record), flush=True)
    if args.profile:
        Path(args.profile).write_text("\n".join(profiles) or "no Triton path here: nothing profiled\n")


if __name__ == "__main__":
    main()
