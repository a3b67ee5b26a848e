"""What ``busy_wait`` buys and what it costs: latency and CPU per call.

    python -m bench.busy_wait
    python -m bench.busy_wait --settings 0,0.0002,0.0005 --calls 2000

One worker context per ``busy_wait`` setting, all open at once in one
``trio.run``. Each round runs a batch of calls of one pattern on every
context, in a shuffled order (so that drift and noise fall on every setting
alike), with a short sleep between batches so that no busy-wait of the last
batch overlaps the next. Per pattern and setting it prints the median call
and the CPU time per call of this process and of the workers, summed over the batches.

Patterns: back-to-back trivial calls; back-to-back 100 µs jobs; trivial calls
1 ms apart (pauses longer than the busy-wait, slept by the caller); trivial
calls between 300 µs of the caller's own CPU work (regular gaps longer than
the limit: the worker sleeps through most of each and busy-waits at its end);
and two tasks calling at once (two workers).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import statistics
import time
from collections.abc import Awaitable, Callable

import psutil
import trio

import trio_parallel_fs as tpf
from trio_parallel_fs._introspect import context_processes

from .jobs import spin, trivial

SETTLE = 0.005  # seconds between two batches: every busy-wait is over by then


def loops_for(seconds: float) -> int:
    """How many ``jobs.spin`` loops take about ``seconds`` here."""
    start = time.perf_counter()
    spin(100_000)
    return max(1, int(100_000 * seconds / (time.perf_counter() - start)))


async def one_call(ctx: tpf.WorkerContext, args: tuple[object, ...]) -> float:
    start = time.perf_counter()
    await ctx.run_sync(*args)  # type: ignore[arg-type]
    return time.perf_counter() - start


def patterns(loops_100us: int) -> dict[str, Callable[[tpf.WorkerContext, int], Awaitable[list[float]]]]:
    loops_300us = 3 * loops_100us

    async def back_to_back(ctx: tpf.WorkerContext, calls: int) -> list[float]:
        return [await one_call(ctx, (trivial,)) for _ in range(calls)]

    async def jobs_of_100us(ctx: tpf.WorkerContext, calls: int) -> list[float]:
        return [await one_call(ctx, (spin, loops_100us)) for _ in range(calls)]

    async def one_ms_apart(ctx: tpf.WorkerContext, calls: int) -> list[float]:
        samples = []
        for _ in range(calls // 10):  # ten times fewer: each waits 1 ms
            await trio.sleep(0.001)
            samples.append(await one_call(ctx, (trivial,)))
        return samples

    async def own_work_between(ctx: tpf.WorkerContext, calls: int) -> list[float]:
        samples = []
        for _ in range(calls):
            spin(loops_300us)  # the caller's own work: a regular gap longer than the limit
            samples.append(await one_call(ctx, (trivial,)))
        return samples

    async def two_callers(ctx: tpf.WorkerContext, calls: int) -> list[float]:
        samples: list[float] = []

        async def caller() -> None:
            for _ in range(calls // 2):
                samples.append(await one_call(ctx, (trivial,)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            nursery.start_soon(caller)
        return samples

    return {
        "back-to-back trivial calls": back_to_back,
        "back-to-back 100 us jobs": jobs_of_100us,
        "trivial calls 1 ms apart": one_ms_apart,
        "trivial calls between 300 us of own work": own_work_between,
        "two tasks calling at once": two_callers,
    }


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """CPU time of the processes' main threads: from /proc/PID/schedstat
    (nanoseconds) on Linux, else psutil's (clock ticks)."""
    total = 0.0
    for process in processes:
        try:
            with open(f"/proc/{process.pid}/schedstat") as file:
                total += int(file.read().split()[0]) / 1e9
        except OSError:
            times = process.cpu_times()
            total += times.user + times.system
    return total


def worker_processes(ctx: tpf.WorkerContext) -> list[psutil.Process]:
    return [psutil.Process(record.pid) for record in context_processes(ctx) if record.role == "worker"]


async def main(settings: list[float], calls: int, rounds: int) -> None:
    me = psutil.Process()
    loops_100us = loops_for(100e-6)
    async with contextlib.AsyncExitStack() as stack:
        contexts = {s: await stack.enter_async_context(tpf.open_worker_context(busy_wait=s)) for s in settings}
        print(f"busy_wait: latency p50 and CPU per call (parent, workers); {rounds} rounds x {calls} calls per batch")
        print(f"{'pattern':42} {'busy_wait':>9} {'p50 µs':>8} {'parent µs':>10} {'workers µs':>11}")
        for name, pattern in patterns(loops_100us).items():
            for ctx in contexts.values():
                await pattern(ctx, 20)  # warm up: workers started, estimates settled
            samples: dict[float, list[float]] = {s: [] for s in settings}
            parent_cpu = dict.fromkeys(settings, 0.0)
            worker_cpu = dict.fromkeys(settings, 0.0)
            order = list(settings)
            for _ in range(rounds):
                random.shuffle(order)
                for setting in order:
                    ctx = contexts[setting]
                    await trio.sleep(SETTLE)
                    workers = worker_processes(ctx)
                    parent_before, workers_before = cpu_seconds([me]), cpu_seconds(workers)
                    samples[setting].extend(await pattern(ctx, calls))
                    parent_cpu[setting] += cpu_seconds([me]) - parent_before
                    worker_cpu[setting] += cpu_seconds(workers) - workers_before
            for setting in settings:
                count = len(samples[setting])
                p50 = statistics.median(samples[setting]) * 1e6
                print(
                    f"{name:42} {setting:>9g} {p50:8.1f} {parent_cpu[setting] / count * 1e6:10.1f} "
                    f"{worker_cpu[setting] / count * 1e6:11.1f}"
                )


def parse_settings(text: str) -> list[float]:
    values = [float(part) for part in text.split(",")]
    if not values or any(math.isnan(v) for v in values):
        raise argparse.ArgumentTypeError(f"a comma-separated list of seconds, not {text!r}")
    return values


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", type=parse_settings, default=[0.0, 0.0002, 0.0005])
    parser.add_argument("--calls", type=int, default=500, help="calls per batch (default 500)")
    parser.add_argument("--rounds", type=int, default=8, help="batches per setting and pattern (default 8)")
    arguments = parser.parse_args()
    trio.run(main, arguments.settings, arguments.calls, arguments.rounds)
