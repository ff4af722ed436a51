"""CPU peak memory of one step: a fresh worker process per variant, its RSS high-water mark above its inputs.

The worker (the benchmark re-run with ``--only VARIANT``) builds the models and inputs, resets the high-water
mark (``VmHWM``, through ``/proc/self/clear_refs``) to the RSS at that moment, runs one step and prints the
high-water mark above that RSS.  ``MALLOC_MMAP_THRESHOLD_`` is pinned so that freed buffers leave the RSS, as
in ``bench/loss_engine.py``.  Linux only (``/proc``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable


def _rss_now() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def print_step_peak(step: Callable[[], object]) -> None:
    """In the worker: run ``step()`` once and print the RSS high-water mark above the RSS before it (bytes)."""
    before = _rss_now()
    with open("/proc/self/clear_refs", "w") as clear:  # reset the high-water mark to the current RSS
        clear.write("5")
    step()
    print(_peak_rss() - before)


def worker_peak(script: str, argv: list[str]) -> int:
    """Run ``python script *argv`` (a worker that ends by :func:`print_step_peak`) and return its figure."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, env=env, check=True)
    return int(done.stdout.strip().splitlines()[-1])
