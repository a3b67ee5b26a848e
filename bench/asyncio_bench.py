"""Under asyncio: ours, anyio.to_process and run_in_executor(ProcessPoolExecutor), side by side.

    python -m bench.asyncio_bench
    python -m bench.asyncio_bench --quick

One ``asyncio.run``, these rows (``python -m bench`` prints them too, measured
by `measure` in an ``asyncio.run`` of their own after its ``trio.run``):

* warm call: ``operator.add`` (well, `jobs.trivial`), interleaved call by call
  (each round one call per system, in a shuffled order, as
  ``bench/warm_interleaved.py`` does under Trio); median.
* fresh worker + numpy/scipy job: ours with ``max_jobs=1`` and the bench's
  preload (numpy, scipy.linalg); anyio.to_process's first call in a new worker
  (anyio keeps one pool per event loop, so each sample is the first call of a
  new loop, in a thread, timed inside it); a new
  ``ProcessPoolExecutor(max_workers=1)``'s first call. Median.
* big arrays: a numpy array as argument (the job returns its size) and as
  result, 16 MB and 128 MB; GB/s of the array's size, median.

The parent never imports numpy itself (the arrays are made in a helper of
ours, below, only when that row runs) so that a forked executor worker pays
for its imports as a user's would.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio.to_process

import trio_parallel_fs as tpf
from bench import jobs
from bench.systems import PRELOAD

MB = 1 << 20
Call = Callable[..., Awaitable[Any]]


async def interleave(calls: dict[str, Callable[[], Awaitable[float]]], rounds: int) -> dict[str, float]:
    """Each round one sample per system, shuffled; the median of each (seconds)."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            samples[name].append(await calls[name]())
    return {name: statistics.median(values) for name, values in samples.items()}


def timer(call: Call, fn: Callable[..., Any], *args: Any) -> Callable[[], Awaitable[float]]:
    async def sample() -> float:
        start = time.perf_counter()
        await call(fn, *args)
        return time.perf_counter() - start

    return sample


def executor_call(executor: concurrent.futures.Executor) -> Call:
    async def call(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    return call


async def started(executor: concurrent.futures.ProcessPoolExecutor) -> None:
    """Have the executor fork its workers now, before our context opens: a
    process forked from this one while a context is open holds copies of its
    workers' channels, and its workers then do not see the context close
    (they are killed after ``grace_period``)."""
    await executor_call(executor)(jobs.trivial)


async def warm(rounds: int) -> dict[str, float]:
    with concurrent.futures.ProcessPoolExecutor() as executor:
        await started(executor)
        async with tpf.open_worker_context(preload=PRELOAD) as ctx:
            calls = {
                "ours": ctx.run_sync,
                "anyio": anyio.to_process.run_sync,
                "executor": executor_call(executor),
            }
            for call in calls.values():
                for _ in range(50):
                    await call(jobs.trivial)
            return await interleave({name: timer(call, jobs.trivial) for name, call in calls.items()}, rounds)


def anyio_first_call() -> float:
    """anyio.to_process's first call in a new worker: a new event loop's pool."""

    async def first() -> float:
        start = time.perf_counter()
        await anyio.to_process.run_sync(jobs.numpy_scipy_job, 1)
        return time.perf_counter() - start

    return asyncio.run(first())


async def executor_first_call() -> float:
    # Forked (Linux's default), it holds copies of our open context's channels
    # (see `started`), but only until the shutdown below.
    executor = concurrent.futures.ProcessPoolExecutor(max_workers=1)
    try:
        start = time.perf_counter()
        await executor_call(executor)(jobs.numpy_scipy_job, 1)
        return time.perf_counter() - start
    finally:
        await asyncio.to_thread(executor.shutdown)


async def fresh(rounds: int) -> dict[str, float]:
    async with tpf.open_worker_context(preload=PRELOAD, max_jobs=1) as ctx:
        await ctx.run_sync(jobs.numpy_scipy_job, 0)

        async def ours() -> float:
            sample = await timer(ctx.run_sync, jobs.numpy_scipy_job, 1)()
            await asyncio.sleep(0.05)  # the retired worker's exit, off the next sample
            return sample

        async def anyio_sample() -> float:
            return await asyncio.to_thread(anyio_first_call)

        return await interleave({"ours": ours, "anyio": anyio_sample, "executor": executor_first_call}, rounds)


def make_array(size: int) -> Any:
    import numpy as np

    return np.ones(size // 8, dtype=np.float64)


async def arrays(sizes: list[int], rounds: int) -> dict[str, dict[str, float]]:
    found: dict[str, dict[str, float]] = {}
    with concurrent.futures.ProcessPoolExecutor() as executor:
        await started(executor)
        async with tpf.open_worker_context(preload=PRELOAD) as ctx:
            calls = {"ours": ctx.run_sync, "anyio": anyio.to_process.run_sync, "executor": executor_call(executor)}
            for size in sizes:
                argument = make_array(size)
                for kind, fn, arg in (("argument", jobs.nbytes, argument), ("result", jobs.cached_array, size)):
                    for call in calls.values():
                        await call(fn, arg)
                    medians = await interleave({name: timer(call, fn, arg) for name, call in calls.items()}, rounds)
                    found[f"{size // MB} MB ndarray {kind}"] = {name: size / s / 1e9 for name, s in medians.items()}
                del argument
    return found


@dataclasses.dataclass
class Row:
    label: str
    unit: str
    values: dict[str, float]  # system: value, "ours" first
    lower_better: bool = True


async def measure(quick: bool, each: Callable[[Row], object] = lambda row: None) -> list[Row]:
    """Every row, each also handed to ``each`` as soon as it is measured."""
    rows: list[Row] = []

    def add(row: Row) -> None:
        rows.append(row)
        each(row)

    medians = await warm(300 if quick else 3000)
    add(Row("warm call p50, interleaved", "µs", {k: v * 1e6 for k, v in medians.items()}))
    medians = await fresh(3 if quick else 10)
    add(Row("fresh worker + numpy/scipy job", "ms", {k: v * 1e3 for k, v in medians.items()}))
    sizes = [16 * MB] if quick else [16 * MB, 128 * MB]
    for label, rates in (await arrays(sizes, 3 if quick else 10)).items():
        add(Row(label, "GB/s", rates, lower_better=False))
    return rows


HEADER = [
    "under asyncio.run; columns: ours, anyio.to_process, run_in_executor(ProcessPoolExecutor)",
    f"{'':<34} {'':<5} {'ours':>10}  {'anyio':>10}  {'executor':>10}",
]
FOOTER = "(ratios: ours' time over theirs; for GB/s their time over ours, also ours/theirs of time)"


def render(row: Row) -> str:
    ours = row.values["ours"]
    ratios = ", ".join(
        f"ours/{name} {ours / value if row.lower_better else value / ours:.3g}x"
        for name, value in row.values.items()
        if name != "ours"
    )
    shown = "  ".join(f"{value:10.2f}" for value in row.values.values())
    return f"{row.label:<34} {row.unit:<5} {shown}   ({ratios})"


async def main(quick: bool) -> None:
    print("\n".join(HEADER))
    await measure(quick, lambda row: print(render(row), flush=True))
    print(FOOTER)


if __name__ == "__main__":  # the executor's and anyio's workers import this module again
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds: a smoke test")
    asyncio.run(main(parser.parse_args().quick))
