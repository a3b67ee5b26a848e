"""A fresh worker with time to prepare, against a warm one, under the same pauses.

    python -m bench.fresh_pauses

Single-use workers (``max_jobs=1``) and a reused one each run 40 calls of a
numpy/scipy job defined here, in ``__main__`` (so it travels by value), with
50 ms between calls; the median of the last 30 is printed, with the job's own
time inside the worker. The pauses let a retiring worker's successor be
prepared, as it would be in a service that is not saturated.
"""

from __future__ import annotations

import statistics
import time

import trio

import trio_parallel_fs as tpf

CALLS, SKIP, PAUSE = 40, 10, 0.05


def job(n: int) -> float:
    start = time.perf_counter()
    import numpy
    import scipy.linalg

    scipy.linalg.det(numpy.eye(n) * 2.0)
    return (time.perf_counter() - start) * 1e3


async def measure(max_jobs: int | None) -> tuple[float, float]:
    calls, inside = [], []
    async with tpf.open_worker_context(preload=["numpy", "scipy.linalg"], max_jobs=max_jobs) as ctx:
        for _ in range(CALLS):
            await trio.sleep(PAUSE)
            start = time.perf_counter()
            inside.append(await ctx.run_sync(job, 8))
            calls.append((time.perf_counter() - start) * 1e3)
    return statistics.median(calls[SKIP:]), statistics.median(inside[SKIP:])


async def main() -> None:
    fresh, fresh_inside = await measure(1)
    warm, warm_inside = await measure(None)
    print(f"fresh worker (max_jobs=1): call p50 {fresh:.2f} ms (job itself {fresh_inside:.2f} ms)")
    print(f"warm worker:               call p50 {warm:.2f} ms (job itself {warm_inside:.2f} ms)")
    print(f"fresh / warm: {fresh / warm:.2f}x, {PAUSE * 1e3:.0f} ms between calls")


if __name__ == "__main__":
    trio.run(main)
