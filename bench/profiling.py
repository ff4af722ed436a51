"""How long a benchmark's run takes (:func:`median_ms`) and where its time goes (:func:`profile_table`: one run
under ``torch.profiler``, its top operators and kernels)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(run: Callable[[], object], device: torch.device, repeats: int, warm_up: bool = True) -> float:
    """The median wall time of ``repeats`` calls of ``run()`` in milliseconds, after one untimed call (Triton's
    compile, cuBLAS's heuristics) unless ``warm_up`` is off; on CUDA the device is synchronized around each
    call."""
    if warm_up:
        run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def profile_table(run: Callable[[], object], device: torch.device, rows: int = 25) -> str:
    """Run ``run()`` once under torch.profiler; its operators and kernels by self device time (CPU time on the
    CPU), the top ``rows``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=key, row_limit=rows)
