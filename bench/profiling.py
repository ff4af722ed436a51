"""Where a benchmark's time goes: one run under ``torch.profiler``, its top operators and kernels."""

from __future__ import annotations

from collections.abc import Callable

import torch


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
