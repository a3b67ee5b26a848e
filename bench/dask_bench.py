"""``python -m bench.dask_bench``: trio_parallel_fs.dask against raw Dask calls.

Starts a LocalCluster (worker processes with one thread each, one per CPU by
default) and measures, in one ``trio.run``, with samples interleaved between
the two ways (each round takes them in a new random order):

- per call, a trivial function: ``ctx.run_sync(fn)`` against
  ``client.submit(fn).result()`` in ``trio.to_thread.run_sync``, the way to
  call Dask from Trio without this package;
- a fan-out of N numpy/scipy jobs at once (default 100): N concurrent
  ``ctx.run_sync`` calls (default limiter) against ``client.map`` and
  ``client.gather`` in one thread;
- the same jobs over M items (default 2000) with ``ctx.map`` (chunks of
  items as Dask tasks, at most one per Dask thread at once) against
  ``client.map`` and ``client.gather`` (one task per item, all submitted at once).

Then, in one ``asyncio.run`` on the same cluster, the trivial call and the
fan-out again, from asyncio: ``ctx.run_sync`` of a context opened with the
scheduler's address (an asynchronous client on the program's loop: no thread)
and of one given the synchronous client (its loop in a thread), against
``await client.submit(fn)`` and ``await client.gather(client.map(...))`` of an
asynchronous client, the way to call Dask from asyncio without this package.

Prints the medians and the ratios. The job functions come from
``bench/jobs.py``, which the workers import (run this from the repository root).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import statistics
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from bench import jobs
from bench.rounds import interleaved


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


async def per_call(client: Any, ctx: Any, calls: int) -> dict[str, list[float]]:
    def raw() -> object:
        return client.submit(jobs.trivial, pure=False).result()

    ways: dict[str, Callable[[], Awaitable[object]]] = {
        "raw submit().result() in a thread": lambda: trio.to_thread.run_sync(raw),
        "ctx.run_sync": lambda: ctx.run_sync(jobs.trivial),
    }
    return await interleaved(ways, calls)


async def fan_out(client: Any, ctx: Any, jobs_count: int, rounds: int) -> dict[str, list[float]]:
    def raw() -> object:
        return client.gather(client.map(jobs.numpy_scipy_job, range(jobs_count), pure=False))

    async def ours(limiter: trio.CapacityLimiter | None) -> None:
        async with trio.open_nursery() as nursery:
            for seed in range(jobs_count):
                nursery.start_soon(functools.partial(ctx.run_sync, jobs.numpy_scipy_job, seed, limiter=limiter))

    # The default limiter keeps one job per Dask thread in flight, so each
    # slot waits a whole round trip between jobs; a limiter as wide as the
    # fan-out lets Dask queue them all, as client.map does.
    wide = trio.CapacityLimiter(jobs_count)
    ways: dict[str, Callable[[], Awaitable[object]]] = {
        "raw map + gather in a thread": lambda: trio.to_thread.run_sync(raw),
        "ctx.run_sync x N, default limiter": lambda: ours(None),
        "ctx.run_sync x N, limiter of N": lambda: ours(wide),
    }
    return await interleaved(ways, rounds)


async def map_items(client: Any, ctx: Any, items: int, rounds: int) -> dict[str, list[float]]:
    def raw() -> object:
        return client.gather(client.map(jobs.numpy_scipy_job, range(items), pure=False))

    ways: dict[str, Callable[[], Awaitable[object]]] = {
        "raw map + gather in a thread": lambda: trio.to_thread.run_sync(raw),
        "ctx.map": lambda: ctx.map(jobs.numpy_scipy_job, range(items)),
    }
    return await interleaved(ways, rounds)


async def measure(
    client: Any, calls: int, jobs_count: int, rounds: int, items: int
) -> dict[str, dict[str, list[float]]]:
    from trio_parallel_fs.dask import open_dask_context

    async with open_dask_context(client, preload=["numpy", "scipy.linalg", "bench.jobs"]) as ctx:
        # Warm up both ways: imports, connections, the workers' first jobs.
        for _ in range(5):
            await ctx.run_sync(jobs.numpy_scipy_job, 0)
            await trio.to_thread.run_sync(lambda: client.submit(jobs.trivial, pure=False).result())
        return {
            "per call, trivial function": await per_call(client, ctx, calls),
            f"fan-out of {jobs_count} numpy/scipy jobs": await fan_out(client, ctx, jobs_count, rounds),
            f"map over {items} items, a numpy/scipy job each": await map_items(client, ctx, items, rounds),
        }


async def measure_asyncio(
    address: str, sync_client: Any, calls: int, jobs_count: int, rounds: int
) -> dict[str, dict[str, list[float]]]:
    from distributed import Client

    from trio_parallel_fs.dask import open_dask_context

    preload = ["numpy", "scipy.linalg", "bench.jobs"]
    async with (
        Client(address, asynchronous=True, set_as_default=False) as client,
        open_dask_context(address, preload=preload) as ours,
        open_dask_context(sync_client, preload=preload) as threaded,
    ):
        for _ in range(5):  # warm up every way
            await ours.run_sync(jobs.numpy_scipy_job, 0)
            await threaded.run_sync(jobs.trivial)
            await client.submit(jobs.trivial, pure=False)

        async def fan_out_of(ctx: Any) -> None:
            await asyncio.gather(*(ctx.run_sync(jobs.numpy_scipy_job, seed) for seed in range(jobs_count)))

        per_call_ways: dict[str, Callable[[], Awaitable[object]]] = {
            "raw await client.submit(fn)": lambda: client.submit(jobs.trivial, pure=False),
            "ctx.run_sync, address": lambda: ours.run_sync(jobs.trivial),
            "ctx.run_sync, sync Client": lambda: threaded.run_sync(jobs.trivial),
        }
        fan_out_ways: dict[str, Callable[[], Awaitable[object]]] = {
            "raw await gather(map)": lambda: client.gather(
                client.map(jobs.numpy_scipy_job, range(jobs_count), pure=False)
            ),
            "ctx.run_sync x N, address": lambda: fan_out_of(ours),
            "ctx.run_sync x N, sync Client": lambda: fan_out_of(threaded),
        }
        return {
            "asyncio: per call, trivial function": await interleaved(per_call_ways, calls),
            f"asyncio: fan-out of {jobs_count} numpy/scipy jobs, default limiter": await interleaved(
                fan_out_ways, rounds
            ),
        }


def report(results: dict[str, dict[str, list[float]]]) -> str:
    lines = []
    for case, samples in results.items():
        medians = {name: statistics.median(values) * 1000 for name, values in samples.items()}
        raw_name, *our_names = medians
        raw = medians[raw_name]
        lines.append(f"{case} (median of {len(samples[raw_name])}):")
        lines.append(f"  {raw_name:36}{raw:10.2f} ms")
        for name in our_names:
            ours = medians[name]
            lines.append(f"  {name:36}{ours:10.2f} ms   ({ours / raw:.2f}x raw, {ours - raw:+.2f} ms)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dask_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=usable_cpus(), help="worker processes (default: the CPUs)")
    parser.add_argument("--calls", type=int, default=200, help="per-call samples for each way (default 200)")
    parser.add_argument("--jobs", type=int, default=100, help="jobs in the fan-out (default 100)")
    parser.add_argument("--items", type=int, default=2000, help="items in the map (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="fan-outs timed for each way (default 5)")
    args = parser.parse_args(argv)
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        print("needs Dask's distributed: pip install 'trio_parallel_fs[dask]'", file=sys.stderr)
        return 2
    with (
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        print(f"Dask LocalCluster: {args.workers} worker processes x 1 thread; Python {sys.version.split()[0]}")
        results = trio.run(measure, client, args.calls, args.jobs, args.rounds, args.items)
        results |= asyncio.run(measure_asyncio(cluster.scheduler_address, client, args.calls, args.jobs, args.rounds))
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
