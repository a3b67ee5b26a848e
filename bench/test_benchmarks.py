"""The benchmark cases, each across the systems that can run it.

Run with ``python -m pytest bench/`` (see conftest.py). Each case is one test
parametrized by system name; the benchmark groups put the systems side by side
in pytest-benchmark's tables. Figures that are not times (jobs/s, scaling,
USS, GB/s) go into each benchmark's ``extra_info`` (shown with
``--benchmark-json``). Timings are of the awaited call only (``trio_benchmark``).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import psutil
import pytest

from bench import jobs, systems

MB = 1 << 20
CPUS = systems.usable_cpus()

# Our systems, as configurations of the plugin's worker_context fixture.
OURS: dict[str, dict[str, Any]] = {
    "tpf-fs": {"preload": systems.PRELOAD},
    "tpf-spawn": {"worker_type": "spawn", "preload": systems.PRELOAD},
    "tpf-fs-fresh": {"preload": systems.PRELOAD, "max_jobs": 1},
    "tpf-spawn-fresh": {"worker_type": "spawn", "preload": systems.PRELOAD, "max_jobs": 1},
    "tpf-fs-maxmem-above-rss": {"preload": systems.PRELOAD, "max_memory": 1 << 40},
    # Between a worker's USS (~2 MB) and RSS (~35 MB, mostly the template's
    # shared pages): the worker must measure its USS after every job.
    "tpf-fs-maxmem-mid": {"preload": systems.PRELOAD, "max_memory": 16 * MB},
}
WARM = ["tpf-fs", "tpf-spawn", "tp-spawn", "tp-fs", "anyio", "thread"]
FRESH = ["tpf-fs-fresh", "tpf-spawn-fresh", "tp-spawn-fresh", "tp-fs-fresh"]


@asynccontextmanager
async def _ours(context: Any) -> AsyncIterator[systems.Caller]:
    yield systems.Caller(context.run_sync, context=context)


@pytest.fixture
def system(request: pytest.FixtureRequest) -> Callable[[], Any]:
    """An async context manager factory for the system named by the parameter.

    Synchronous, so that ours can come from the leak-checked worker_context
    fixture (which starts its template outside Trio): the test's marker
    configures it.
    """
    name = request.param
    if name in OURS:
        request.node.add_marker(pytest.mark.worker_context(**OURS[name]))
        context = request.getfixturevalue("worker_context")
        return lambda: _ours(context)
    return systems.SYSTEMS[name][1]


def median(trio_benchmark: Any) -> float | None:
    """The benchmark's median; None when timing is off (--benchmark-disable)."""
    stats = trio_benchmark.stats
    return None if stats is None else float(stats.stats.median)


def systems_param(names: list[str]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("system", names, indirect=True)


async def warm_up(caller: systems.Caller, fn: Callable[..., Any], *args: Any, calls: int = 20) -> None:
    for _ in range(calls):
        await caller.call(fn, *args)


# --- warm calls ---------------------------------------------------------------------------


@pytest.mark.benchmark(group="warm call, trivial function")
@systems_param([*WARM, "echo"])
async def test_warm_call(trio_benchmark: Any, system: Any) -> None:
    async with system() as caller:
        await warm_up(caller, jobs.trivial)
        await trio_benchmark(caller.call, jobs.trivial)


@pytest.mark.benchmark(group="warm call, per-job memory check")
@systems_param(["tpf-fs", "tpf-fs-maxmem-above-rss", "tpf-fs-maxmem-mid"])
async def test_memory_check(trio_benchmark: Any, system: Any) -> None:
    async with system() as caller:
        await warm_up(caller, jobs.trivial)
        pid = await caller.call(os.getpid)
        info = psutil.Process(pid).memory_full_info()
        trio_benchmark.extra_info.update(worker_uss_mb=info.uss / MB, worker_rss_mb=info.rss / MB)
        await trio_benchmark(caller.call, jobs.trivial)


# --- fresh workers ------------------------------------------------------------------------


@pytest.mark.benchmark(group="fresh worker + numpy/scipy job")
@systems_param([*FRESH, "fork"])
async def test_fresh_worker(trio_benchmark: Any, system: Any) -> None:
    # The fork floor's figure here includes asking its helper (a socket round
    # trip, tens of µs); python -m bench reports the helper's own measurement.
    async with system() as caller:
        await warm_up(caller, jobs.numpy_scipy_job, 0, calls=2)
        await trio_benchmark(caller.call, jobs.numpy_scipy_job, 1)


@pytest.mark.parametrize("size", [8, 32])
@systems_param(FRESH)
async def test_concurrent_fresh_workers(trio_benchmark: Any, system: Any, size: int) -> None:
    trio_benchmark.benchmark.group = f"{size} concurrent fresh-worker jobs"
    async with system() as caller:
        await warm_up(caller, jobs.numpy_scipy_job, 0, calls=2)
        await trio_benchmark.pedantic(systems.fan_out, args=(caller, size, jobs.numpy_scipy_job, 2), rounds=3)


# --- many jobs, many CPUs ---------------------------------------------------------------------

TINY_JOBS = 1000


@pytest.mark.benchmark(group=f"throughput: {TINY_JOBS} tiny jobs at once")
@systems_param(WARM)
async def test_throughput(trio_benchmark: Any, system: Any) -> None:
    async with system() as caller:
        await systems.fan_out(caller, CPUS * 2, jobs.numpy_scipy_pid, 0, 0.05)  # every CPU's worker started
        await trio_benchmark.pedantic(systems.fan_out, args=(caller, TINY_JOBS, jobs.trivial), rounds=3)
        if (seconds := median(trio_benchmark)) is not None:
            trio_benchmark.extra_info["jobs_per_second"] = TINY_JOBS / seconds


@pytest.mark.benchmark(group=f"CPU-bound: {CPUS} jobs on {CPUS} CPUs")
@systems_param(WARM)
async def test_cpu_scaling(trio_benchmark: Any, system: Any) -> None:
    loops = 2_000_000  # ~0.1 s of pure Python here
    async with system() as caller:
        await systems.fan_out(caller, CPUS, jobs.spin, loops // 10)
        one = []
        for _ in range(3):
            start = time.perf_counter()
            await caller.call(jobs.spin, loops)
            one.append(time.perf_counter() - start)
        await trio_benchmark.pedantic(systems.fan_out, args=(caller, CPUS, jobs.spin, loops), rounds=3)
        if (many := median(trio_benchmark)) is not None:
            one_job = statistics.median(one)
            trio_benchmark.extra_info.update(one_job_s=one_job, scaling=CPUS * one_job / many)


# --- memory ---------------------------------------------------------------------------------


@pytest.mark.benchmark(group="numpy/scipy job on a new worker (USS in extra_info)")
@systems_param(["tpf-fs", "tpf-spawn", "tp-spawn", "tp-fs", "anyio"])
async def test_worker_uss(trio_benchmark: Any, system: Any) -> None:
    async with system() as caller:
        pid = await trio_benchmark.pedantic(caller.call, args=(jobs.numpy_scipy_pid, 0), rounds=1)
        trio_benchmark.extra_info["worker_uss_mb"] = psutil.Process(pid).memory_full_info().uss / MB


# --- large arguments and results --------------------------------------------------------------


@pytest.mark.parametrize("direction", ["argument", "result", "round trip"])
@pytest.mark.parametrize("size", [MB, 128 * MB], ids=["1MB", "128MB"])
@systems_param(WARM)
async def test_ndarray_transfer(trio_benchmark: Any, system: Any, size: int, direction: str) -> None:
    import numpy as np

    trio_benchmark.benchmark.group = f"{size // MB} MB ndarray {direction}"
    argument = np.ones(size // 8)
    async with system() as caller:
        if direction == "argument":
            fn, args = jobs.nbytes, (argument,)
        elif direction == "round trip":  # there and back: twice the size moved per call
            fn, args = jobs.identity, (argument,)
        else:
            fn, args = jobs.cached_array, (size,)
        await warm_up(caller, fn, *args, calls=1)
        if size > MB:
            await trio_benchmark.pedantic(caller.call, args=(fn, *args), rounds=3)
        else:
            await trio_benchmark(caller.call, fn, *args)
        if (seconds := median(trio_benchmark)) is not None:
            moved = 2 * size if direction == "round trip" else size
            trio_benchmark.extra_info["GB_per_s"] = moved / seconds / 1e9
