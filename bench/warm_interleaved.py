"""The warm call interleaved call by call with anyio.to_process and trio.to_thread.

    python -m bench.warm_interleaved
    python -m bench.warm_interleaved --calls 3000 --busy-wait 0 0.0002 0.0005
    taskset -c 0 python -m bench.warm_interleaved      # everything on one CPU

In one Trio run, each round calls ``operator.add`` once on each system, in a
shuffled order, so that every call of ours follows calls of the others: the
harshest case for ``busy_wait``, since our worker waits for its next job
through the other systems' calls. Prints each system's median and our ratios,
for each ``busy_wait`` asked for (a context per setting, measured one after
another).
"""

from __future__ import annotations

import argparse
import operator
import random
import statistics
import time
from collections.abc import Awaitable, Callable

import anyio
import anyio.to_process
import trio

import trio_parallel_fs as tpf


async def measure(busy_wait: float, calls: int) -> dict[str, float]:
    async with tpf.open_worker_context(busy_wait=busy_wait) as ctx:
        systems: dict[str, Callable[[], Awaitable[object]]] = {
            "ours": lambda: ctx.run_sync(operator.add, 1, 2),
            "anyio": lambda: anyio.to_process.run_sync(operator.add, 1, 2),
            "thread": lambda: trio.to_thread.run_sync(operator.add, 1, 2),
        }
        for call in systems.values():  # warm up: every worker started
            for _ in range(50):
                await call()
        samples: dict[str, list[float]] = {name: [] for name in systems}
        order = list(systems)
        for _ in range(calls):
            random.shuffle(order)
            for name in order:
                start = time.perf_counter()
                await systems[name]()
                samples[name].append((time.perf_counter() - start) * 1e6)
        return {name: statistics.median(values) for name, values in samples.items()}


async def main(busy_waits: list[float], calls: int) -> None:
    print(f"warm call p50 in µs, {calls} rounds, one call per system per round, shuffled")
    for busy_wait in busy_waits:
        p50 = await measure(busy_wait, calls)
        print(
            f"busy_wait={busy_wait:g}: ours {p50['ours']:.1f}, anyio.to_process {p50['anyio']:.1f}, "
            f"trio.to_thread {p50['thread']:.1f}; ours/anyio {p50['ours'] / p50['anyio']:.2f}, "
            f"ours/thread {p50['ours'] / p50['thread']:.2f}"
        )


if __name__ == "__main__":  # anyio.to_process workers import this module again
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="rounds (default 2000)")
    parser.add_argument("--busy-wait", type=float, nargs="+", default=[0.0002], help="settings to measure")
    arguments = parser.parse_args()
    anyio.run(main, arguments.busy_wait, arguments.calls, backend="trio")
