"""Loss engine vs the naive PyTorch path, side by side in one run.

The naive path is what a user writes without the engine: full student logits
``h Wᵀ`` (and full teacher logits), upcast to fp32, the same registry
divergence via ``token_divergence``, mean, backward.  The engine path is
``fdivctl.engine.divergence_loss`` with the same inputs.  Both compute the
same number; the benchmark asserts that before timing anything.

Prints one JSON object per (shape, divergence) with, at least: ``shape``,
``divergence``, ``naive_peak_bytes``, ``engine_peak_bytes``, ``memory_ratio``
(naive/engine), ``naive_s``, ``engine_s``, ``time_ratio`` (naive/engine; a
forward+backward step, median of ``--repeats``), and ``memory_method``:

* cuda: ``torch.cuda.max_memory_allocated`` above the allocation after the
  inputs were built;
* cpu: each variant runs in a fresh subprocess; peak = the process's RSS
  high-water mark (``ru_maxrss``) minus its RSS once the inputs exist.
  tracemalloc cannot see torch's allocations, so it is not used.  The
  memory worker pins glibc's mmap threshold (``MALLOC_MMAP_THRESHOLD_``) so
  that freed buffers leave the RSS instead of lingering in the heap; the
  timing worker runs with the default allocator, whose peaks are reported
  too (``*_peak_bytes_default_malloc``, for the first divergence of a run
  only: later ones share that process's high-water mark).

Usage::

    python bench/loss_engine.py --quick                     # CPU, < 60 s
    python bench/loss_engine.py                             # CPU, incl. N=4096 H=1024 V=32768
    python bench/loss_engine.py --device cuda --dtype bf16  # GPU shapes
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from fdivctl import divergences, engine

CPU_QUICK = [(2048, 256, 16384)]
CPU_FULL = [(1024, 256, 8192), (2048, 512, 16384), (4096, 1024, 32768)]
CUDA_SHAPES = [(8192, 4096, 128256), (16384, 4096, 128256), (8192, 4096, 151936)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOPK = 64


def build_inputs(shape, dtype, device, target_kind, seed=0):
    """Student h, W and the target's tensors, made directly in ``dtype`` on ``device``."""
    n, h, v = shape
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=g, device=device, dtype=dtype) * scale)

    inputs = {
        "hidden": randn(n, h).requires_grad_(True),
        "weight": randn(v, h, scale=h**-0.5).requires_grad_(True),
    }
    if target_kind == "head":
        inputs["t_hidden"] = randn(n, h)
        inputs["t_weight"] = randn(v, h, scale=h**-0.5)
    elif target_kind == "full":
        inputs["t_logits"] = randn(n, v)
    else:  # topk: ids, log-probs and tail as the logit store gives them
        raw = torch.randn(n, TOPK + 1, generator=g, device=device)
        log_buckets = torch.log_softmax(raw, -1)
        inputs["ids"] = _distinct_ids(n, v, g, device)
        inputs["logprobs"] = log_buckets[:, :TOPK].to(torch.bfloat16)
        inputs["log_tail"] = log_buckets[:, TOPK]
    return inputs


def _distinct_ids(n, v, g, device):
    """k distinct ids per row without an [n, v] buffer: a random offset plus a random stride."""
    start = torch.randint(0, v, (n, 1), generator=g, device=device)
    return ((start + torch.arange(TOPK, device=device) * 7919) % v).to(torch.int32)


def naive_step(inputs, divergence):
    """Full logits in fp32, the registry divergence on them, mean, backward."""
    logits = (inputs["hidden"] @ inputs["weight"].T).float()
    if "t_logits" in inputs:
        teacher = inputs["t_logits"].float()
    elif "t_hidden" in inputs:
        teacher = (inputs["t_hidden"] @ inputs["t_weight"].T).float()
    else:
        teacher = None
    if teacher is not None:
        per_token = divergence.token_divergence(logits, teacher)
    else:
        log_q = torch.log_softmax(logits, -1)
        target = engine.TopK(inputs["ids"], inputs["logprobs"], inputs["log_tail"])
        per_token = divergence.support_divergence(*target.support(slice(None), log_q, 1.0))
    loss = per_token.mean()
    loss.backward()
    return loss.detach()


def engine_target(inputs):
    if "t_logits" in inputs:
        return engine.FullLogits(inputs["t_logits"])
    if "t_hidden" in inputs:
        return engine.TeacherHead(inputs["t_hidden"], inputs["t_weight"])
    return engine.TopK(inputs["ids"], inputs["logprobs"], inputs["log_tail"])


def engine_step(inputs, divergence, grad_mode="forward", chunk_size=None):
    loss = engine.divergence_loss(
        inputs["hidden"], inputs["weight"], engine_target(inputs), divergence,
        grad_mode=grad_mode, chunk_size=chunk_size,
    )
    loss.backward()
    return loss.detach()


def _zero_grads(inputs):
    for name in ("hidden", "weight"):
        inputs[name].grad = None


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(variant, shape, dtype, device, target_kind, divergence, repeats, grad_mode, chunk_size):
    """Peak bytes above the inputs, median seconds of one step, and the loss value."""
    step = {
        "naive": lambda inp: naive_step(inp, divergence),
        "engine": lambda inp: engine_step(inp, divergence, grad_mode, chunk_size),
    }[variant]
    inputs = build_inputs(shape, dtype, device, target_kind)
    _sync(device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        import psutil  # CPU path only

        base = psutil.Process().memory_info().rss
    loss = step(inputs)
    _sync(device)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        _zero_grads(inputs)
        _sync(device)
        start = time.perf_counter()
        step(inputs)
        _sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times) if times else None
    return {"peak_bytes": int(peak), "seconds": seconds, "loss": float(loss)}


def _worker(variant, args, shape, div_specs, repeats, env=None):
    """Measure ``variant`` for each divergence in a fresh process; one result dict per divergence."""
    cmd = [
        sys.executable, __file__, "--worker", variant, "--device", args.device, "--dtype", args.dtype,
        "--target", args.target, "--repeats", str(repeats), "--grad-mode", args.grad_mode,
        "--worker-shape", ",".join(map(str, shape)), "--divergences", ",".join(div_specs),
    ]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise SystemExit(f"benchmark worker {variant} failed:\n{done.stderr}")
    return [json.loads(line) for line in done.stdout.strip().splitlines()[-len(div_specs):]]


def _measure_in_subprocesses(variant, args, shape, div_specs):
    """Per divergence: peak from its own process with a pinned mmap threshold (the RSS high-water
    mark is per process); times from one default-allocator process for all divergences."""
    timings = _worker(variant, args, shape, div_specs, args.repeats)
    results = []
    for i, (spec, timing) in enumerate(zip(div_specs, timings)):
        (memory,) = _worker(variant, args, shape, [spec], 0, {"MALLOC_MMAP_THRESHOLD_": "131072"})
        # the timing process's high-water mark is clean for its first divergence only
        default_peak = timing["peak_bytes"] if i == 0 else None
        results.append({**timing, "peak_bytes": memory["peak_bytes"], "peak_bytes_default_malloc": default_peak})
    return results


def run_shape(args, shape, div_specs):
    """One record per divergence at ``shape``, naive and engine measured side by side."""
    results = {}
    for variant in ("naive", "engine"):
        if args.device == "cpu":
            results[variant] = _measure_in_subprocesses(variant, args, shape, div_specs)
            continue
        results[variant] = []
        for spec in div_specs:
            try:
                results[variant].append(measure(
                    variant, shape, DTYPES[args.dtype], args.device, args.target, divergences.parse(spec),
                    args.repeats, args.grad_mode, args.chunk_size,
                ))
            except torch.cuda.OutOfMemoryError:
                results[variant].append({"peak_bytes": None, "seconds": None, "loss": None, "oom": True})
            torch.cuda.empty_cache()
    return [_record(args, shape, spec, {v: results[v][i] for v in results}) for i, spec in enumerate(div_specs)]


def _record(args, shape, div_spec, results):
    naive, eng = results["naive"], results["engine"]
    if naive["loss"] is not None and eng["loss"] is not None:
        rel = abs(naive["loss"] - eng["loss"]) / max(abs(naive["loss"]), 1e-12)
        if rel > 1e-3:
            raise SystemExit(f"engine loss {eng['loss']} differs from naive {naive['loss']} at {shape}")

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    return {
        "shape": {"N": shape[0], "H": shape[1], "V": shape[2]},
        "divergence": div_spec,
        "dtype": args.dtype,
        "target": args.target,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "grad_mode": args.grad_mode,
        "memory_method": "cuda max_memory_allocated" if args.device == "cuda" else (
            "subprocess RSS high-water (ru_maxrss) minus RSS after inputs, MALLOC_MMAP_THRESHOLD_=131072"
        ),
        "naive_peak_bytes": naive["peak_bytes"],
        "engine_peak_bytes": eng["peak_bytes"],
        "memory_ratio": ratio(naive["peak_bytes"], eng["peak_bytes"]),
        "naive_s": naive["seconds"],
        "engine_s": eng["seconds"],
        "time_ratio": ratio(naive["seconds"], eng["seconds"]),
        "naive_oom": bool(naive.get("oom")),
        **{
            f"{name}_peak_bytes_default_malloc": results[name]["peak_bytes_default_malloc"]
            for name in ("naive", "engine")
            if "peak_bytes_default_malloc" in results[name]
        },
        "loss": eng["loss"],
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default fp32 on cpu, bf16 on cuda")
    parser.add_argument("--quick", action="store_true", help="small CPU shapes, under 60 s")
    parser.add_argument("--shapes", nargs="*", default=None, help="N,H,V triples (override the defaults)")
    parser.add_argument("--divergences", default="jsd,fkl", help="comma-separated registry names")
    parser.add_argument("--target", choices=["head", "full", "topk"], default="head",
                        help="teacher hidden+head (online KD), full teacher logits, or a top-k store")
    parser.add_argument("--grad-mode", choices=list(engine.GRAD_MODES), default="forward")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--worker", choices=["naive", "engine"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-shape", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        shape = tuple(int(x) for x in args.worker_shape.split(","))
        for spec in args.divergences.split(","):
            result = measure(
                args.worker, shape, DTYPES[args.dtype], "cpu", args.target,
                divergences.parse(spec), args.repeats, args.grad_mode, args.chunk_size,
            )
            print(json.dumps(result), flush=True)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]
    elif args.device == "cuda":
        shapes = CUDA_SHAPES
    else:
        shapes = CPU_QUICK if args.quick else CPU_FULL
    for shape in shapes:
        for record in run_shape(args, shape, args.divergences.split(",")):
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
