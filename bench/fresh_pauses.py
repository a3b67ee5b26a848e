"""A fresh worker with time to prepare, against a warm one, under the same pauses.

    python -m bench.fresh_pauses

Single-use workers (``max_jobs=1``) and a reused one each run 60 calls of a
numpy/scipy job, alternating, with 50 ms before each call; the median of the
last 50 is printed. Two jobs: one defined here, in ``__main__`` (it travels
by value, through cloudpickle; the job's own time inside the worker is
printed too), and one from a module the template preloads (by reference),
the latter also with an ``init`` hook that runs the job once: a successor
prepared ahead runs its init hook before any call needs it, so the pages the
job touches are copied (copy-on-write) while nobody waits.
The pauses let a retiring worker's successor be prepared, as it would be in
a service that is not saturated.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import trio

import trio_parallel_fs as tpf

from . import jobs

CALLS, SKIP, PAUSE = 60, 10, 0.05
PRELOAD = ["numpy", "scipy.linalg", "bench.jobs"]


def job(n: int) -> float:
    start = time.perf_counter()
    import numpy
    import scipy.linalg

    scipy.linalg.det(numpy.eye(n) * 2.0)
    return (time.perf_counter() - start) * 1e3


async def compare(
    fn: Callable[[int], float], arg: int, init: Callable[[], object] = bool
) -> tuple[dict[str, float], dict[str, float]]:
    """Call p50 and result p50 (ms) of fresh and warm workers, alternating."""
    calls: dict[str, list[float]] = {"fresh": [], "warm": []}
    results: dict[str, list[float]] = {"fresh": [], "warm": []}
    async with (
        tpf.open_worker_context(preload=PRELOAD, max_jobs=1, init=init) as fresh,
        tpf.open_worker_context(preload=PRELOAD, init=init) as warm,
    ):
        contexts = {"fresh": fresh, "warm": warm}
        for _ in range(CALLS):
            # Alternate, so that drift and noise fall on both alike.
            for name, ctx in contexts.items():
                await trio.sleep(PAUSE)
                start = time.perf_counter()
                results[name].append(await ctx.run_sync(fn, arg))
                calls[name].append((time.perf_counter() - start) * 1e3)
    return (
        {name: statistics.median(samples[SKIP:]) for name, samples in calls.items()},
        {name: statistics.median(samples[SKIP:]) for name, samples in results.items()},
    )


async def main() -> None:
    print(f"{PAUSE * 1e3:.0f} ms before each call, fresh and warm alternating; call p50:")
    p50, inside = await compare(job, 8)
    print(
        f"job from __main__ (by value):  fresh (max_jobs=1) {p50['fresh']:.2f} ms (job itself "
        f"{inside['fresh']:.2f}), warm {p50['warm']:.2f} ms (job itself {inside['warm']:.2f}): "
        f"{p50['fresh'] / p50['warm']:.2f}x"
    )
    for label, init in [("", bool), (", init warms it", functools.partial(jobs.numpy_scipy_job, 0))]:
        p50, _ = await compare(jobs.numpy_scipy_job, 1, init)
        print(
            f"job from a preloaded module{label}:  fresh (max_jobs=1) {p50['fresh']:.2f} ms, "
            f"warm {p50['warm']:.2f} ms: {p50['fresh'] / p50['warm']:.2f}x"
        )


if __name__ == "__main__":
    trio.run(main)
