"""The warm call interleaved call by call with anyio.to_process and trio.to_thread.

    python -m bench.warm_interleaved
    python -m bench.warm_interleaved --calls 3000 --busy-wait 0 0.0002 0.0005
    taskset -c 0 python -m bench.warm_interleaved      # everything on one CPU

In one Trio run, each round calls ``operator.add`` once on each system, in a
shuffled order, so that every call of ours follows calls of the others: the
harshest case for ``busy_wait``, since our worker waits for its next job
through the other systems' calls. Prints each system's median and our ratios,
for each ``busy_wait`` asked for (a context per setting, measured one after
another), and what a call costs in CPU: the caller's (the Trio thread during
the call) and the worker's (its processes over the whole run, busy-waits
between calls included, per call; for trio.to_thread the other threads of
this process during the call).
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
import psutil
import trio

import trio_parallel_fs as tpf
from bench.busy_wait import cpu_seconds, worker_processes

Result = dict[str, tuple[float, float, float]]  # system: (p50, caller CPU, worker CPU) per call, µs


def anyio_workers(ctx: tpf.WorkerContext) -> list[psutil.Process]:
    """anyio's worker processes: this process's children but our template."""
    template = ctx.statistics().template_pid
    return [child for child in psutil.Process().children() if child.pid != template]


async def measure(busy_wait: float, calls: int) -> Result:
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
        caller_ns = dict.fromkeys(systems, 0)
        others_ns = dict.fromkeys(systems, 0)  # other threads of this process
        processes = {"ours": worker_processes(ctx), "anyio": anyio_workers(ctx)}
        before = {name: cpu_seconds(found) for name, found in processes.items()}
        order = list(systems)
        for _ in range(calls):
            random.shuffle(order)
            for name in order:
                thread, process = time.thread_time_ns(), time.process_time_ns()
                start = time.perf_counter()
                await systems[name]()
                samples[name].append((time.perf_counter() - start) * 1e6)
                thread = time.thread_time_ns() - thread
                caller_ns[name] += thread
                others_ns[name] += time.process_time_ns() - process - thread
        worker_s = {name: cpu_seconds(found) - before[name] for name, found in processes.items()}
        worker_s["thread"] = others_ns["thread"] / 1e9
        return {
            name: (statistics.median(values), caller_ns[name] / calls / 1e3, worker_s[name] / calls * 1e6)
            for name, values in samples.items()
        }


async def main(busy_waits: list[float], calls: int) -> None:
    print(f"warm call p50 in µs, {calls} rounds, one call per system per round, shuffled")
    for busy_wait in busy_waits:
        result = await measure(busy_wait, calls)
        p50 = {name: values[0] for name, values in result.items()}
        print(
            f"busy_wait={busy_wait:g}: ours {p50['ours']:.1f}, anyio.to_process {p50['anyio']:.1f}, "
            f"trio.to_thread {p50['thread']:.1f}; ours/anyio {p50['ours'] / p50['anyio']:.2f}, "
            f"ours/thread {p50['ours'] / p50['thread']:.2f}"
        )
        print(
            "  CPU µs per call, caller + worker: "
            + ", ".join(f"{name} {caller:.1f} + {worker:.1f}" for name, (_, caller, worker) in result.items())
        )


if __name__ == "__main__":  # anyio.to_process workers import this module again
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="rounds (default 2000)")
    parser.add_argument("--busy-wait", type=float, nargs="+", default=[0.0002], help="settings to measure")
    arguments = parser.parse_args()
    anyio.run(main, arguments.busy_wait, arguments.calls, backend="trio")
