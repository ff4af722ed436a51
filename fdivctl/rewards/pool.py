"""Run a verifier over many rows in worker processes, each row under a time limit.

A row whose verification outlives ``timeout`` seconds, or whose worker dies
(a crash in a parser, exhausted memory), gets reward 0 with the reason in its
verdict; the worker is killed and replaced, and the run goes on.  Results
come back in row order.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait

Result = tuple[float, bool, str]
# Every failed verification's verdict starts with this: a raised error, a timeout, a dead worker.
FAILURE = "verifier failed: "


def failures(verdicts: Sequence[str | None]) -> list[int]:
    """Indices of the rows whose verification failed (scored 0 for it, not judged wrong)."""
    return [i for i, v in enumerate(verdicts) if v is not None and v.startswith(FAILURE)]


def _serve(conn: Connection, verifier) -> None:
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        index, row = message
        try:
            result = verifier(row)
            result = (float(result[0]), bool(result[1]), str(result[2])[:500])
        except Exception as err:  # noqa: BLE001 - a verifier error is that row's verdict
            result = (0.0, False, f"{FAILURE}{type(err).__name__}: {str(err)[:300]}")
        conn.send((index, result))


class _Worker:
    def __init__(self, ctx, verifier):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, verifier), daemon=True)
        self.process.start()
        child.close()
        self.task: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


def run_pool(
    verifier,
    rows: Sequence[dict],
    workers: int,
    timeout: float,
    on_done: Callable[[int], None] | None = None,
) -> list[Result]:
    """``verifier(row)`` for every row, in ``workers`` processes, ``timeout`` seconds each."""
    ctx = mp.get_context("fork")
    results: list[Result | None] = [None] * len(rows)
    pending = list(range(len(rows)))[::-1]
    pool = [_Worker(ctx, verifier) for _ in range(max(1, min(workers, len(rows))))]
    try:
        while pending or any(w.task is not None for w in pool):
            for worker in pool:
                if worker.task is None and pending:
                    worker.task = pending.pop()
                    worker.deadline = time.monotonic() + timeout
                    worker.conn.send((worker.task, rows[worker.task]))
            busy = [w for w in pool if w.task is not None]
            ready = wait([w.conn for w in busy], timeout=max(0.0, min(w.deadline for w in busy) - time.monotonic()))
            now = time.monotonic()
            for i, worker in enumerate(pool):
                if worker.task is None:
                    continue
                failure = None
                if worker.conn in ready:
                    try:
                        index, result = worker.conn.recv()
                        results[index] = result
                    except (EOFError, OSError):
                        failure = f"{FAILURE}its process died (exit code {worker.process.exitcode})"
                elif now >= worker.deadline:
                    failure = f"{FAILURE}timeout after {timeout:g}s"
                else:
                    continue
                if failure is not None:
                    results[worker.task] = (0.0, False, failure)
                    worker.kill()
                    pool[i] = _Worker(ctx, verifier)
                else:
                    worker.task = None
                if on_done:
                    on_done(1)
    finally:
        for worker in pool:
            worker.kill()
    return results  # type: ignore[return-value]
