"""Loss engine vs the naive PyTorch path (and, on CUDA, vs Liger-Kernel), side by side in one run.

The naive path is what a user writes without the engine: full student logits
``h Wᵀ`` (and full teacher logits), upcast to fp32, the same registry
divergence via ``token_divergence``, mean, backward.  The engine path is
``fdivctl.engine.divergence_loss`` with the same inputs.  Both compute the
same number; the benchmark asserts that before timing anything.

Variants (``--variants``): ``naive``; ``engine`` — ``divergence_loss`` on the
PyTorch chunk path (``kernel="torch"``); ``triton`` — the same with the fused
Triton row kernels (``kernel="triton"``, CUDA; the head's gradient accumulated
in fp32); ``triton_bf16acc`` — accumulated in the weight's bf16
(``weight_grad_accum="param"``); ``liger`` — Liger-Kernel's
``LigerFusedLinearJSD`` as shipped (jsd β ↔ its ``jsd_beta``, fkl = 0, rkl = 1;
teacher hidden+head targets; accumulates in the weight's dtype);
``liger_fp32acc`` — the same with ``accum_dtype=torch.float32``; ``gemm_floor`` —
the ``triton`` variant's matmuls alone, chunked as it chunks them, with no row
kernel and no loss (:func:`gemm_floor_step`): ``gemm_floor_vs_{ours}`` = the
floor's time / ours is the share of our step the GEMMs take, so 1 − it is what
faster row kernels could still save, and ``gemm_floor_tflops`` the matmul rate
the chunking allows.  Each variant
reports ``{variant}_s``, ``{variant}_peak_bytes`` and ``{variant}_tflops``
(``matmul_flops`` / time, counting 2·N·H·V per matmul: forward, grad hidden,
grad weight, and the teacher's forward); ``{ours}_speedup_vs_{theirs}`` =
their time / ours and ``{ours}_memory_vs_{theirs}`` = our peak / theirs, for
(triton, liger), (triton_bf16acc, liger) and (triton, liger_fp32acc).
``matmul_ceiling_tflops`` is one square matmul's rate on the same chip in the same run
(:func:`matmul_ceiling_tflops`: 8192³ on CUDA) and ``{variant}_ceiling_fraction`` each variant's
``_tflops`` over it: how near the chip's measured matmul rate the whole step runs.

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

On CUDA a variant that runs out of memory reports ``{variant}_oom``, and one that raises anything else (a kernel the
chip or its Triton refuses) ``{variant}_error`` with the message; the other variants are timed all the same.

Usage::

    python bench/loss_engine.py --quick                     # CPU, < 60 s
    python bench/loss_engine.py                             # CPU, incl. N=4096 H=1024 V=32768
    python bench/loss_engine.py --device cuda --dtype bf16  # GPU shapes, all four variants
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from profiling import median_ms  # bench/profiling.py, beside this script

from fdivctl import divergences, engine

CPU_QUICK = [(2048, 256, 16384)]
CPU_FULL = [(1024, 256, 8192), (2048, 512, 16384), (4096, 1024, 32768)]
CUDA_SHAPES = [
    (n, h, v) for n in (8192, 32768) for h in (2048, 4096) for v in (128256, 151936)
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOPK = 64
VARIANTS = ("naive", "engine", "triton", "triton_bf16acc", "liger", "liger_fp32acc", "gemm_floor")


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


def engine_step(inputs, divergence, grad_mode="forward", chunk_size=None, kernel="torch", accum="fp32",
                weight_grad_rows=None):
    loss = engine.divergence_loss(
        inputs["hidden"], inputs["weight"], engine_target(inputs), divergence,
        grad_mode=grad_mode, chunk_size=chunk_size, kernel=kernel, weight_grad_accum=accum,
        weight_grad_rows=weight_grad_rows,
    )
    loss.backward()
    return loss.detach()


def gemm_floor_step(inputs, chunk_size=None, weight_grad_rows=None):
    """The fused step's matmuls alone, as :func:`fdivctl.engine.sweep.sweep` chunks them with the fp32
    accumulator: per chunk the student's and the teacher's fp32 logits and the hidden gradient, and every
    ``weight_grad_rows`` rows the head gradient's GEMM into ``[V, H]`` fp32
    (:class:`~fdivctl.engine.sweep.PendingWeightGrad`), the logit gradients read as zeros of the weight's dtype.
    No row kernel and no loss: the time that chunking cannot go below."""
    from types import SimpleNamespace

    from fdivctl.engine.matmul import input_grad, linear_fp32, matmul_weight
    from fdivctl.engine.sweep import PendingWeightGrad

    hidden, weight = inputs["hidden"].detach(), matmul_weight(inputs["weight"].detach())
    teacher = None if "t_hidden" not in inputs else (inputs["t_hidden"], matmul_weight(inputs["t_weight"]))
    (n, h), v = hidden.shape, weight.shape[0]
    chunk = chunk_size or engine.default_chunk_size(n, v, hidden.device)
    plan = SimpleNamespace(chunk_size=chunk,
                           weight_grad_rows=weight_grad_rows or engine.default_weight_grad_rows(chunk, h, hidden.device))
    grad_hidden = torch.empty_like(hidden)
    pending = PendingWeightGrad(torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device), hidden,
                                weight.dtype, plan)
    zeros = torch.zeros(chunk, v, dtype=weight.dtype, device=hidden.device)  # one chunk's logit gradient
    if pending.buffer is not None:
        pending.buffer.zero_()
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        linear_fp32(hidden[rows], weight)
        if teacher is not None:
            linear_fp32(teacher[0][rows], teacher[1])
        grad = pending.slot(rows)
        grad = zeros[: rows.stop - rows.start] if grad is None else grad
        input_grad(grad, weight, out=grad_hidden[rows])
        pending.add(grad, rows)
    pending.flush()


def liger_beta(divergence):
    """Liger's ``jsd_beta`` for a registry entry: its generalized JSD has our convention
    (``β KL(p‖m) + (1−β) KL(q‖m)``, ``m = βp + (1−β)q``), with 0 = forward KL and 1 = reverse KL."""
    return {"fkl": 0.0, "rkl": 1.0}.get(divergence.name, divergence.params.get("beta"))


def liger_step(inputs, divergence, accum_dtype=None):
    """Liger-Kernel's ``LigerFusedLinearJSD`` (teacher hidden + head targets only); its default
    accumulates the head's gradient in the weight's dtype, ``accum_dtype=torch.float32`` in fp32."""
    from liger_kernel.transformers import LigerFusedLinearJSD

    loss = LigerFusedLinearJSD(jsd_beta=liger_beta(divergence), accum_dtype=accum_dtype)(
        inputs["hidden"], inputs["weight"], inputs["t_hidden"], inputs["t_weight"], None
    )
    loss.backward()
    return loss.detach()


def matmul_flops(shape, target_kind):
    """FLOPs of the step's matmuls, 2·N·H·V each: forward, grad hidden, grad weight, and the
    teacher's forward for a teacher-head target (the recompute mode's extra forward is not counted)."""
    n, h, v = shape
    return 2 * n * h * v * (4 if target_kind == "head" else 3)


def matmul_ceiling_tflops(dtype, device, size=None, repeats=10):
    """The rate of one square ``size³`` matmul of random ``dtype`` operands on ``device`` (8192 on CUDA, 1024 on
    the CPU), median of ``repeats`` after a warm-up (:func:`profiling.median_ms`): the chip's measured matmul
    ceiling, beside which each variant's ``{variant}_ceiling_fraction`` is read (its datasheet rate is a lead, not
    a reading)."""
    size = size or (8192 if device == "cuda" else 1024)
    generator = torch.Generator(device=device).manual_seed(1)
    a, b = (torch.randn(size, size, generator=generator, device=device).to(dtype) for _ in range(2))
    return 2 * size**3 / median_ms(lambda: torch.mm(a, b), torch.device(device), repeats) / 1e9


def _zero_grads(inputs):
    for name in ("hidden", "weight"):
        inputs[name].grad = None


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(variant, shape, dtype, device, target_kind, divergence, repeats, grad_mode, chunk_size,
            weight_grad_rows=None):
    """Peak bytes above the inputs, median seconds of one step, and the loss value."""
    rows = weight_grad_rows
    step = {
        "naive": lambda inp: naive_step(inp, divergence),
        "engine": lambda inp: engine_step(inp, divergence, grad_mode, chunk_size, "torch", "fp32", rows),
        "triton": lambda inp: engine_step(inp, divergence, grad_mode, chunk_size, "triton", "fp32", rows),
        "triton_bf16acc": lambda inp: engine_step(inp, divergence, grad_mode, chunk_size, "triton", "param", rows),
        "liger": lambda inp: liger_step(inp, divergence),
        "liger_fp32acc": lambda inp: liger_step(inp, divergence, torch.float32),
        "gemm_floor": lambda inp: gemm_floor_step(inp, chunk_size, rows),
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
    return {"peak_bytes": int(peak), "seconds": seconds, "loss": None if loss is None else float(loss)}


def _worker(variant, args, shape, div_specs, repeats, env=None):
    """Measure ``variant`` for each divergence in a fresh process; one result dict per divergence."""
    cmd = [
        sys.executable, __file__, "--worker", variant, "--device", args.device, "--dtype", args.dtype,
        "--target", args.target, "--repeats", str(repeats), "--grad-mode", args.grad_mode,
        "--worker-shape", ",".join(map(str, shape)), "--divergences", ",".join(div_specs),
    ]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    if args.weight_grad_rows:
        cmd += ["--weight-grad-rows", str(args.weight_grad_rows)]
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
    for variant in args.variants:
        if args.device == "cpu":
            results[variant] = _measure_in_subprocesses(variant, args, shape, div_specs)
            continue
        results[variant] = []
        for spec in div_specs:
            if variant.startswith("liger") and (args.target != "head" or liger_beta(divergences.parse(spec)) is None):
                results[variant].append({"peak_bytes": None, "seconds": None, "loss": None, "unsupported": True})
                continue
            try:
                results[variant].append(measure(
                    variant, shape, DTYPES[args.dtype], args.device, args.target, divergences.parse(spec),
                    args.repeats, args.grad_mode, args.chunk_size, args.weight_grad_rows,
                ))
            except torch.cuda.OutOfMemoryError:
                results[variant].append({"peak_bytes": None, "seconds": None, "loss": None, "oom": True})
            except Exception as error:  # noqa: BLE001 — one variant the chip or its compiler refuses: the others go on
                results[variant].append({"peak_bytes": None, "seconds": None, "loss": None,
                                         "error": f"{type(error).__name__}: {error}"[:500]})
            torch.cuda.empty_cache()
    return [_record(args, shape, spec, {v: results[v][i] for v in results}) for i, spec in enumerate(div_specs)]


def _record(args, shape, div_spec, results):
    ref = next(results[v] for v in ("engine", "triton", "naive", *results) if v in results)
    for variant, result in results.items():
        if result["loss"] is None or ref["loss"] is None:
            continue
        rel = abs(result["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-12)
        # Liger rounds its logits to the input dtype before the fp32 softmax (DESIGN.md): looser
        if rel > (2e-2 if variant.startswith("liger") else 1e-3):
            raise SystemExit(f"{variant} loss {result['loss']} differs from {ref['loss']} at {shape}")

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    def get(variant, key):
        return results.get(variant, {}).get(key)

    flops = matmul_flops(shape, args.target)
    device = torch.device(args.device)
    chunk = args.chunk_size or engine.default_chunk_size(shape[0], shape[2], device)
    record = {
        "shape": {"N": shape[0], "H": shape[1], "V": shape[2]},
        "divergence": div_spec,
        "dtype": args.dtype,
        "target": args.target,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "grad_mode": args.grad_mode,
        "chunk_size": chunk,
        "weight_grad_rows": args.weight_grad_rows or engine.default_weight_grad_rows(chunk, shape[1], device),
        "weight_grad_rows_bf16acc": args.weight_grad_rows or engine.default_weight_grad_rows(chunk, shape[1], device,
                                                                                             "param"),
        "memory_method": "cuda max_memory_allocated" if args.device == "cuda" else (
            "subprocess RSS high-water (ru_maxrss) minus RSS after inputs, MALLOC_MMAP_THRESHOLD_=131072"
        ),
        "matmul_flops": flops,
        "matmul_ceiling_tflops": args.matmul_ceiling_tflops,
    }
    for variant, result in results.items():
        record[f"{variant}_peak_bytes"] = result["peak_bytes"]
        record[f"{variant}_s"] = result["seconds"]
        record[f"{variant}_tflops"] = None if result["seconds"] is None else flops / result["seconds"] / 1e12
        record[f"{variant}_ceiling_fraction"] = ratio(record[f"{variant}_tflops"], args.matmul_ceiling_tflops)
        record[f"{variant}_loss"] = result["loss"]
        record[f"{variant}_oom"] = bool(result.get("oom"))
        if result.get("unsupported"):
            record[f"{variant}_unsupported"] = True
        if result.get("error"):
            record[f"{variant}_error"] = result["error"]
        if "peak_bytes_default_malloc" in result:
            record[f"{variant}_peak_bytes_default_malloc"] = result["peak_bytes_default_malloc"]
    record.update({
        "memory_ratio": ratio(get("naive", "peak_bytes"), get("engine", "peak_bytes")),
        "time_ratio": ratio(get("naive", "seconds"), get("engine", "seconds")),
        "naive_oom": bool(results.get("naive", {}).get("oom")),
        "loss": ref["loss"],
    })
    if "triton" in results:
        record["triton_speedup_vs_torch_engine"] = ratio(get("engine", "seconds"), get("triton", "seconds"))
    for ours, theirs in (("triton", "liger"), ("triton_bf16acc", "liger"), ("triton", "liger_fp32acc")):
        if ours in results and theirs in results:
            record[f"{ours}_speedup_vs_{theirs}"] = ratio(get(theirs, "seconds"), get(ours, "seconds"))
            record[f"{ours}_memory_vs_{theirs}"] = ratio(get(ours, "peak_bytes"), get(theirs, "peak_bytes"))
    for ours in ("engine", "triton"):
        if ours in results and "gemm_floor" in results:
            record[f"gemm_floor_vs_{ours}"] = ratio(get("gemm_floor", "seconds"), get(ours, "seconds"))
    return record


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
    parser.add_argument("--chunk-size", default=None,
                        help="token rows per head chunk (the engine's default when not given); comma-separated: each")
    parser.add_argument("--weight-grad-rows", default=None,
                        help="logit-gradient rows per weight-gradient GEMM (engine's weight_grad_rows; 0 or not given: "
                        "its default); comma-separated: each, for each --chunk-size")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--variants", default=None,
        help="comma-separated, from naive, engine (PyTorch chunk path), triton (fused kernels), triton_bf16acc, "
        "liger (LigerFusedLinearJSD; jsd/fkl/rkl with --target head), liger_fp32acc, gemm_floor (the fused step's "
        "matmuls alone); default naive,engine,gemm_floor on cpu, all on cuda",
    )
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--worker-shape", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    default_variants = "naive,engine,gemm_floor" if args.device == "cpu" else ",".join(VARIANTS)
    args.variants = (args.variants or default_variants).split(",")
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown[0]!r}; valid: {', '.join(VARIANTS)}")
    return args


def _int_list(text):
    """``"512,1024"`` → [512, 1024]; None → [None] (the engine's default); 0 stands for the default too."""
    return [int(x) or None for x in text.split(",")] if text else [None]


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        args.chunk_size = args.chunk_size and int(args.chunk_size)
        args.weight_grad_rows = args.weight_grad_rows and int(args.weight_grad_rows)
        shape = tuple(int(x) for x in args.worker_shape.split(","))
        for spec in args.divergences.split(","):
            result = measure(
                args.worker, shape, DTYPES[args.dtype], "cpu", args.target,
                divergences.parse(spec), args.repeats, args.grad_mode, args.chunk_size, args.weight_grad_rows,
            )
            print(json.dumps(result), flush=True)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    args.matmul_ceiling_tflops = matmul_ceiling_tflops(DTYPES[args.dtype], args.device)
    chunk_sizes = _int_list(args.chunk_size)
    grad_rows = _int_list(args.weight_grad_rows)
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]
    elif args.device == "cuda":
        shapes = CUDA_SHAPES
    else:
        shapes = CPU_QUICK if args.quick else CPU_FULL
    for shape in shapes:
        for args.chunk_size, args.weight_grad_rows in itertools.product(chunk_sizes, grad_rows):
            for record in run_shape(args, shape, args.divergences.split(",")):
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
