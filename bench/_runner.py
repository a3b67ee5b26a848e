"""``python -m bench``: every system side by side in one run, a table, a plot, JSON.

How the numbers are taken, and why:

* All systems live in one ``trio.run``, opened once and warmed up before any
  timing. Samples are **interleaved**: each round takes samples from every
  system in a shuffled order, so that the noise of a shared machine (other
  processes, frequency changes) falls on all of them alike rather than on
  whichever ran during a bad second.
* Times are ``time.perf_counter`` around the awaited call, as a caller sees
  it. Each case reports the median (and the warm call its p99 too).
* Default limiters everywhere (one token per CPU for the process pools), as a
  user would have them.
* The floors are measured the same way, in the same rounds: (a) a raw
  socketpair round trip to an echo process, awaited with
  ``trio.lowlevel.wait_readable``; (b) fork+exit+waitpid in a process with
  numpy and scipy imported, measured inside that process; (c) memcpy of the
  array, for the large-array cases (a round trip's floor is the same rate:
  two copies of the array, counted as twice its size).
* The rows under asyncio (ours, anyio.to_process and
  ``run_in_executor(ProcessPoolExecutor)``: ``bench/asyncio_bench.py``) are
  measured after the ``trio.run`` ends, in an ``asyncio.run`` of their own,
  and printed below the table (measurement ``asyncio``; not plotted).
* Every process the run starts is gone when it ends: contexts close, the
  helpers exit on EOF, multiprocessing's forkserver and resource tracker are
  stopped, and anything left is reported (and killed) before exiting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import trio

from bench import asyncio_bench, jobs, map_bench, systems

MB = 1 << 20
GB = 1 << 30
# From this size on, arrays are measured for ours and the floor only: the
# peers move them at 0.2-0.3 GB/s, minutes for a few rounds.
ARRAYS_OURS_ONLY = GB
# The round trip (an identity job: the array goes to the worker and comes back)
# is measured at this size, cold and back to back; see array_cases.
ROUND_TRIP_SIZE = MB
# Back-to-back calls timed per system per round in the warm round trip, after
# one untimed call that wakes the worker and the caller up.
ROUND_TRIP_BURST = 10

# Table columns, in order; "floor" is whichever floor fits the case.
COLUMNS = ["tpf-fs", "tpf-spawn", "tp-spawn", "tp-fs", "anyio", "thread", "floor"]
COLUMN_TITLES = {
    "tpf-fs": "ours fs",
    "tpf-spawn": "ours spawn",
    "tp-spawn": "tp spawn",
    "tp-fs": "tp fs+pre",
    "anyio": "anyio",
    "thread": "thread",
    "floor": "floor",
}
WARM = {name: name for name in ["tpf-fs", "tpf-spawn", "tp-spawn", "tp-fs", "anyio", "thread"]}
FRESH = {
    "tpf-fs": "tpf-fs-fresh",
    "tpf-spawn": "tpf-spawn-fresh",
    "tp-spawn": "tp-spawn-fresh",
    "tp-fs": "tp-fs-fresh",
}


@dataclass
class Settings:
    quick: bool
    warm_rounds: int
    warm_reps: int
    fresh_rounds: int
    fresh_budget: float  # seconds per round a quick system may fill with extra samples
    concurrent_rounds: dict[int, int]
    concurrent_spawn: dict[int, bool]  # run the slow spawn systems at this size?
    tiny_jobs: int
    tiny_rounds: int
    spin_seconds: float
    scale_rounds: int
    array_rounds: dict[int, int]

    @classmethod
    def full(cls) -> Settings:
        return cls(
            quick=False,
            warm_rounds=30,
            warm_reps=100,
            fresh_rounds=10,
            fresh_budget=0.15,
            concurrent_rounds={8: 5, 32: 3},
            concurrent_spawn={8: True, 32: True},
            tiny_jobs=2000,
            tiny_rounds=3,
            spin_seconds=0.1,
            scale_rounds=5,
            array_rounds={MB: 30, 16 * MB: 15, 128 * MB: 5, GB: 3},
        )

    @classmethod
    def quick_mode(cls) -> Settings:
        return cls(
            quick=True,
            warm_rounds=10,
            warm_reps=30,
            fresh_rounds=2,
            fresh_budget=0.05,
            concurrent_rounds={8: 1, 32: 1},
            # 32 spawned interpreters importing numpy+scipy take ~20 s: not for a smoke test.
            concurrent_spawn={8: True, 32: False},
            tiny_jobs=300,
            tiny_rounds=1,
            spin_seconds=0.03,
            scale_rounds=2,
            array_rounds={MB: 5, 16 * MB: 2, 128 * MB: 1},
        )


@dataclass
class Case:
    key: str
    label: str
    unit: str
    scale: float  # display value = sample * scale
    higher_better: bool
    columns: dict[str, str]  # column -> system measured
    measurement: str
    floor: str | None = None  # measured floor system, shown as the "floor" column
    stat: str = "median"


def cases(settings: Settings) -> list[Case]:
    fresh_8 = FRESH if settings.concurrent_spawn[8] else {k: FRESH[k] for k in ("tpf-fs", "tp-fs")}
    fresh_32 = FRESH if settings.concurrent_spawn[32] else {k: FRESH[k] for k in ("tpf-fs", "tp-fs")}
    return [
        Case("warm_p50", "warm call p50, trivial fn", "µs", 1e6, False, WARM, "warm", "echo"),
        Case("warm_p99", "warm call p99, trivial fn", "µs", 1e6, False, WARM, "warm", "echo", stat="p99"),
        Case("fresh", "fresh worker + numpy/scipy job", "ms", 1e3, False, FRESH, "fresh", "fork"),
        Case("concurrent_8", "8 concurrent fresh-worker jobs", "ms", 1e3, False, fresh_8, "concurrent_8"),
        Case("concurrent_32", "32 concurrent fresh-worker jobs", "ms", 1e3, False, fresh_32, "concurrent_32"),
        Case("throughput", f"throughput, {settings.tiny_jobs} tiny jobs", "jobs/s", 1.0, True, WARM, "throughput"),
        Case("scaling", f"CPU scaling, {systems.usable_cpus()} jobs/{systems.usable_cpus()} CPUs vs 1",
             "×", 1.0, True, WARM, "scaling"),
        Case("uss", "USS per worker after numpy/scipy", "MB", 1 / MB, False,
             {k: WARM[k] for k in ("tpf-fs", "tpf-spawn", "tp-spawn", "tp-fs", "anyio")}, "uss"),
        *array_cases(settings),
    ]


def size_label(size: int) -> tuple[str, str]:
    """(key part, display) of an array size: ("16mb", "16 MB"), ("1gb", "1 GB")."""
    if size >= GB:
        return f"{size // GB}gb", f"{size // GB} GB"
    return f"{size // MB}mb", f"{size // MB} MB"


def array_systems(size: int) -> dict[str, str]:
    if size >= ARRAYS_OURS_ONLY:
        return {k: WARM[k] for k in ("tpf-fs", "tpf-spawn")}
    return WARM


def array_cases(settings: Settings) -> list[Case]:
    found = []
    for size in settings.array_rounds:
        key, shown = size_label(size)
        only = " (ours only)" if size >= ARRAYS_OURS_ONLY else ""
        for kind in ("arg", "result"):
            label = f"{shown} ndarray {'argument' if kind == 'arg' else 'result'}{only}"
            found.append(
                Case(f"{kind}_{key}", label, "GB/s", 1e-9, True, array_systems(size), f"{kind}_{key}", f"memcpy_{key}")
            )
        if size == ROUND_TRIP_SIZE:
            # GB/s counts both ways: twice the array's size per call.
            for kind, how in (("roundtrip", "cold"), ("roundtrip_warm", "warm")):
                label = f"{shown} ndarray round trip, {how}"
                measured = f"{kind}_{key}"
                found.append(Case(measured, label, "GB/s", 1e-9, True, array_systems(size), measured, f"memcpy_{key}"))
    return found


MEASUREMENTS = ["warm", "memcheck", "fresh", "concurrent", "throughput", "scaling", "uss", "arrays", "map", "asyncio"]


# --- measuring ------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(f"  ... {message}", file=sys.stderr, flush=True)


class Pool:
    """Systems opened on first use and closed together at the end of the run."""

    def __init__(self, stack: contextlib.AsyncExitStack) -> None:
        self._stack = stack
        self._open: dict[str, systems.Caller] = {}
        self.startup: dict[str, float] = {}

    async def get(self, name: str) -> systems.Caller:
        if name not in self._open:
            start = time.perf_counter()
            self._open[name] = await self._stack.enter_async_context(systems.SYSTEMS[name][1]())
            self.startup[name] = time.perf_counter() - start
        return self._open[name]

    async def open(self, name: str, factory: Callable[[], Any]) -> systems.Caller:
        """Open a system that is not in the registry (made up during the run)."""
        start = time.perf_counter()
        self._open[name] = await self._stack.enter_async_context(factory())
        self.startup[name] = time.perf_counter() - start
        return self._open[name]

    async def get_all(self, names: list[str]) -> dict[str, systems.Caller]:
        return {name: await self.get(name) for name in names}


async def timed(coro: Awaitable[Any]) -> float:
    start = time.perf_counter()
    await coro
    return time.perf_counter() - start


async def interleave(
    callers: dict[str, systems.Caller],
    sample: Callable[[str, systems.Caller], Awaitable[float]],
    rounds: int,
    rng: random.Random,
    reps: int | None = None,
    budget: float | None = None,
    settle: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, list[float]]:
    """Take ``rounds`` rounds of samples, every system in each round in a new order.

    ``reps`` samples per system per round; or, with ``budget``, as many as fit
    in ``budget`` seconds going by a first sample (at least 1, at most 10), so
    quick systems give more samples without slow ones taking forever.
    ``settle`` runs after each sample, untimed.
    """
    counts: dict[str, int] = {}
    samples: dict[str, list[float]] = {name: [] for name in callers}
    for name, caller in callers.items():
        if reps is not None:
            counts[name] = reps
        else:
            first = await sample(name, caller)
            counts[name] = max(1, min(10, int((budget or 0) / max(first, 1e-6))))
    names = list(callers)
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            for _ in range(counts[name]):
                samples[name].append(await sample(name, callers[name]))
                if settle is not None:
                    await settle()
    return samples


def live_descendants() -> int:
    count = 0
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                count += 1
        except psutil.Error:
            pass
    return count


def settler(timeout: float = 3.0) -> Callable[[], Awaitable[None]]:
    """Wait, after a sample, until the single-use workers it retired have exited.

    A retired worker leaves after its reply, so its exit (unmapping a process
    that imported numpy and scipy takes milliseconds, a spawned interpreter
    more) would otherwise run during the next system's sample.
    """
    baseline = live_descendants()

    async def settle() -> None:
        deadline = time.monotonic() + timeout
        # Polling is the only way: nothing signals another process's exit here.
        while live_descendants() > baseline and time.monotonic() < deadline:  # noqa: ASYNC110
            await trio.sleep(0.002)

    return settle


async def warm_up(callers: dict[str, systems.Caller], fn: Callable[..., Any], *args: Any, calls: int = 1) -> None:
    for caller in callers.values():
        for _ in range(calls):
            await caller.call(fn, *args)


def spin_loops(seconds: float) -> int:
    """How many ``jobs.spin`` loops take about ``seconds`` here."""
    loops = 10_000
    while True:
        start = time.perf_counter()
        jobs.spin(loops)
        elapsed = time.perf_counter() - start
        if elapsed > 0.01:
            return max(1, int(loops * seconds / elapsed))
        loops *= 4


def uss_of(pid: int) -> int:
    return int(psutil.Process(pid).memory_full_info().uss)


async def measure(settings: Settings, selected: list[str], seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    data: dict[str, dict[str, list[float]]] = {}
    notes: dict[str, Any] = {}
    cpus = systems.usable_cpus()
    async with contextlib.AsyncExitStack() as stack:
        pool = Pool(stack)

        if "warm" in selected:
            progress("starting the warm systems (templates preload numpy+scipy)")
            callers = await pool.get_all([*WARM.values(), "echo"])
            await warm_up(callers, jobs.trivial, calls=20)
            progress(f"warm calls: {settings.warm_rounds * settings.warm_reps} per system, interleaved")
            data["warm"] = await interleave(
                callers,
                lambda name, c: timed(c.call(jobs.trivial)),
                settings.warm_rounds,
                rng,
                reps=settings.warm_reps,
            )

        if "memcheck" in selected:
            progress("per-job memory check: max_memory set (above RSS, and between USS and RSS) vs not")
            callers = await pool.get_all(["tpf-fs", "tpf-fs-maxmem"])
            # The worker reads its RSS first (cheap) and only measures USS when
            # RSS is above the limit: a limit between the two takes the slow
            # path on every job. Place one there, from a worker's actual figures.
            pid = await callers["tpf-fs"].call(os.getpid)
            info = psutil.Process(pid).memory_full_info()
            limit = int((info.uss + info.rss) / 2)
            notes["memcheck_worker"] = {"uss_mb": info.uss / MB, "rss_mb": info.rss / MB, "limit_mb": limit / MB}
            callers["tpf-fs-maxmem-mid"] = await pool.open(
                "tpf-fs-maxmem-mid", lambda: systems.tpf_context("forkserver", max_memory=limit)
            )
            await warm_up(callers, jobs.trivial, calls=20)
            mid_pid = await callers["tpf-fs-maxmem-mid"].call(os.getpid)
            mid_info = psutil.Process(mid_pid).memory_full_info()
            notes["memcheck_mid_worker"] = {"uss_mb": mid_info.uss / MB, "rss_mb": mid_info.rss / MB}
            notes["memcheck_mid_takes_slow_path"] = mid_info.rss > limit > mid_info.uss
            data["memcheck"] = await interleave(
                callers,
                lambda name, c: timed(c.call(jobs.trivial)),
                settings.warm_rounds,
                rng,
                reps=settings.warm_reps,
            )

        if "uss" in selected:
            progress("USS per worker after a numpy/scipy job (dedicated contexts)")
            data["uss"] = {}
            for name in ["tpf-fs", "tpf-spawn", "tp-spawn", "tp-fs", "anyio"]:
                # Fresh contexts (anyio's pool is per run: its workers so far ran
                # trivial jobs only), so each worker ran this job and nothing else.
                async with systems.SYSTEMS[name][1]() as caller:
                    pids: set[int] = set()

                    async def one(seed: int, caller: systems.Caller = caller, pids: set[int] = pids) -> None:
                        # linger: hold the worker so that each call lands on its own.
                        pids.add(await caller.call(jobs.numpy_scipy_pid, seed, 0.3))

                    async with trio.open_nursery() as nursery:
                        for seed in range(cpus):
                            nursery.start_soon(one, seed)
                    data["uss"][name] = [float(uss_of(pid)) for pid in sorted(pids)]
                    if name == "tpf-fs":
                        template = caller.extra["context"].statistics().template_pid
                        if template:
                            info = psutil.Process(template).memory_full_info()
                            notes["template_memory_mb"] = {"rss": info.rss / MB, "uss": info.uss / MB}

        if "fresh" in selected:
            progress("fresh single-use workers running a numpy/scipy job")
            callers = await pool.get_all([*FRESH.values(), "fork"])
            await warm_up(callers, jobs.numpy_scipy_job, 0, calls=2)

            async def fresh_sample(name: str, caller: systems.Caller) -> float:
                if name == "fork":
                    return float(await caller.call(None))  # the helper's own measurement
                return await timed(caller.call(jobs.numpy_scipy_job, 1))

            data["fresh"] = await interleave(
                callers, fresh_sample, settings.fresh_rounds, rng, budget=settings.fresh_budget, settle=settler()
            )

        if "concurrent" in selected:
            for size, rounds in settings.concurrent_rounds.items():
                names = list(FRESH.values()) if settings.concurrent_spawn[size] else [FRESH["tpf-fs"], FRESH["tp-fs"]]
                progress(f"{size} concurrent fresh-worker jobs ({', '.join(names)})")
                callers = await pool.get_all(names)
                await warm_up(callers, jobs.numpy_scipy_job, 0)
                data[f"concurrent_{size}"] = await interleave(
                    callers,
                    lambda name, c, size=size: timed(systems.fan_out(c, size, jobs.numpy_scipy_job, 2)),
                    rounds,
                    rng,
                    reps=1,
                    settle=settler(),
                )

        if "throughput" in selected:
            progress(f"throughput: {settings.tiny_jobs} tiny jobs at once, default limiters")
            callers = await pool.get_all(list(WARM.values()))
            # Every CPU's worker started, so the first round does not pay for it.
            for caller in callers.values():
                await systems.fan_out(caller, cpus * 2, jobs.numpy_scipy_pid, 0, 0.05)
            seconds = await interleave(
                callers,
                lambda name, c: timed(systems.fan_out(c, settings.tiny_jobs, jobs.trivial)),
                settings.tiny_rounds,
                rng,
                reps=1,
            )
            data["throughput"] = {name: [settings.tiny_jobs / s for s in values] for name, values in seconds.items()}

        if "scaling" in selected:
            loops = spin_loops(settings.spin_seconds)
            notes["spin_loops"] = loops
            progress(f"CPU scaling: {cpus} spin jobs of ~{settings.spin_seconds * 1000:.0f} ms on {cpus} CPUs vs one")
            callers = await pool.get_all(list(WARM.values()))
            for caller in callers.values():
                await systems.fan_out(caller, cpus, jobs.spin, loops // 10)

            async def scaling_sample(name: str, caller: systems.Caller) -> float:
                one = await timed(caller.call(jobs.spin, loops))
                many = await timed(systems.fan_out(caller, cpus, jobs.spin, loops))
                return cpus * one / many

            data["scaling"] = await interleave(callers, scaling_sample, settings.scale_rounds, rng, reps=1)

        if "map" in selected:
            data["map"] = await map_bench.measure(settings.quick, rng, cpus, progress)

        if "arrays" in selected:
            import numpy as np

            for size, rounds in settings.array_rounds.items():
                label, shown = size_label(size)
                callers = await pool.get_all(list(array_systems(size).values()))
                progress(f"{shown} ndarray arguments and results, {rounds} rounds, {', '.join(callers)}")
                argument = np.ones(size // 8)
                await warm_up(callers, jobs.nbytes, argument)
                await warm_up(callers, jobs.cached_array, size)

                async def send(name: str, caller: systems.Caller, argument: Any = argument) -> float:
                    return await timed(caller.call(jobs.nbytes, argument))

                async def receive(name: str, caller: systems.Caller, size: int = size) -> float:
                    return await timed(caller.call(jobs.cached_array, size))

                for kind, sample in (("arg", send), ("result", receive)):
                    seconds = await interleave(callers, sample, rounds, rng, reps=1)
                    data[f"{kind}_{label}"] = {name: [size / s for s in values] for name, values in seconds.items()}
                if size == ROUND_TRIP_SIZE:
                    await warm_up(callers, jobs.identity, argument)

                    async def round_trip(name: str, caller: systems.Caller, argument: Any = argument) -> float:
                        return await timed(caller.call(jobs.identity, argument))

                    async def burst(name: str, caller: systems.Caller, argument: Any = argument) -> float:
                        # Warm: the untimed call wakes both ends (and, for ours,
                        # lets busy-waiting engage); then the median of a burst.
                        await caller.call(jobs.identity, argument)
                        times = [await timed(caller.call(jobs.identity, argument)) for _ in range(ROUND_TRIP_BURST)]
                        return statistics.median(times)

                    progress(
                        f"{shown} ndarray round trips: {rounds} rounds cold, "
                        f"{rounds} of {ROUND_TRIP_BURST} calls in a row"
                    )
                    for kind, sample in (("roundtrip", round_trip), ("roundtrip_warm", burst)):
                        seconds = await interleave(callers, sample, rounds, rng, reps=1)
                        data[f"{kind}_{label}"] = {name: [2 * size / s for s in vals] for name, vals in seconds.items()}
                memcpy = systems.memcpy_seconds(size, max(rounds, 5))
                data[f"memcpy_{label}"] = {"memcpy": [size / s for s in memcpy]}
                del argument
    notes["startup_seconds"] = pool.startup
    return {"data": data, "notes": notes}


# --- reporting --------------------------------------------------------------------------------


def statistic(values: list[float], stat: str) -> float | None:
    if not values:
        return None
    if stat == "p99":
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return statistics.median(values)


def case_values(case: Case, data: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    """Display values by column for one case."""
    values: dict[str, float] = {}
    measured = data.get(case.measurement, {})
    for column, system in case.columns.items():
        value = statistic(measured.get(system, []), case.stat)
        if value is not None:
            values[column] = value * case.scale
    if case.floor is not None:
        floor_data = data.get(case.measurement, {}).get(case.floor) or next(
            iter(data.get(case.floor, {}).values()), None
        )
        value = statistic(floor_data or [], case.stat)
        if value is not None:
            values["floor"] = value * case.scale
    return values


def advantage(case: Case, ours: float | None, other: float | None) -> float | None:
    """How many times better ours is (>1: ours wins), whichever way the unit points."""
    if ours is None or other is None or ours <= 0 or other <= 0:
        return None
    return ours / other if case.higher_better else other / ours


def versus_floor(case: Case, ours: float | None, floor: float | None) -> float | None:
    """Ours in multiples of the floor's cost (1.0: as good as the floor)."""
    if ours is None or floor is None or ours <= 0 or floor <= 0:
        return None
    return floor / ours if case.higher_better else ours / floor


def fmt(value: float | None, width: int = 10) -> str:
    if value is None:
        return f"{'—':>{width}}"
    if value >= 10000:
        text = f"{value:,.0f}"
    elif value >= 100:
        text = f"{value:.0f}"
    elif value >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text:>{width}}"


def fmt_ratio(value: float | None, width: int = 9) -> str:
    if value is None:
        return f"{'—':>{width}}"
    text = f"{value:.0f}×" if value >= 100 else f"{value:.2f}×" if value < 10 else f"{value:.1f}×"
    return f"{text:>{width}}"


def build_report(settings: Settings, measured: dict[str, Any]) -> dict[str, Any]:
    data = measured["data"]
    rows = []
    for case in cases(settings):
        if case.measurement not in data:
            continue
        values = case_values(case, data)
        rows.append(
            {
                "case": asdict(case),
                "values": values,
                "samples": {col: len(data[case.measurement].get(sys_, [])) for col, sys_ in case.columns.items()},
                "ours_vs_tp_spawn": advantage(case, values.get("tpf-fs"), values.get("tp-spawn")),
                "ours_vs_tp_fs": advantage(case, values.get("tpf-fs"), values.get("tp-fs")),
                "ours_spawn_vs_tp_spawn": advantage(case, values.get("tpf-spawn"), values.get("tp-spawn")),
                "ours_vs_anyio": advantage(case, values.get("tpf-fs"), values.get("anyio")),
                "ours_vs_floor": versus_floor(case, values.get("tpf-fs"), values.get("floor")),
            }
        )
    report: dict[str, Any] = {"rows": rows}
    if "asyncio" in measured:
        report["asyncio"] = [asdict(row) for row in measured["asyncio"]]
    if "map" in data:
        report["map"] = map_bench.summarize(data["map"])
    if "memcheck" in data:
        without = statistic(data["memcheck"]["tpf-fs"], "median")
        assert without is not None
        report["memcheck"] = {"without_us": without * 1e6}
        for key, system in (("above_rss", "tpf-fs-maxmem"), ("mid", "tpf-fs-maxmem-mid")):
            with_check = statistic(data["memcheck"].get(system, []), "median")
            if with_check is None:
                continue
            report["memcheck"][key] = {
                "with_us": with_check * 1e6,
                "cost_us": (with_check - without) * 1e6,
                "cost_percent": (with_check / without - 1) * 100,
            }
    return report


def render(settings: Settings, report: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        f"trio_parallel_fs benchmarks ({'quick' if settings.quick else 'full'} run) — "
        f"Python {meta['python']}, {meta['cpus']} CPUs, {meta['platform']}",
        "ours = trio_parallel_fs (fs: forkserver template with preload); tp = trio-parallel 1.3.0 "
        "(fs+pre: forkserver with set_forkserver_preload); medians unless p99.",
        "floors: warm = socketpair echo round trip; fresh = fork+exit+waitpid with numpy+scipy; "
        "arrays = in-process memcpy.",
        f"{size_label(ROUND_TRIP_SIZE)[1]} round trip: an identity job, GB/s = 2 × size / call time; cold: one call "
        f"per system in turn, as in the other cases;",
        f"  warm: {ROUND_TRIP_BURST} calls in a row after an untimed one (the median of each such burst).",
        f"arrays of {size_label(ARRAYS_OURS_ONLY)[1]} and more: ours and the floor only "
        "(the peers would take minutes).",
        "",
    ]
    head = f"{'case':<38}{'unit':>7}" + "".join(f"{COLUMN_TITLES[c]:>11}" for c in COLUMNS)
    lines += [head, "-" * len(head)]
    for row in report["rows"]:
        case = row["case"]
        arrow = " ↑" if case["higher_better"] else ""
        cells = "".join(fmt(row["values"].get(c), 11) for c in COLUMNS)
        lines.append(f"{case['label'] + arrow:<38}{case['unit']:>7}{cells}")
    lines += [
        "",
        "↑: higher is better. Ratios: how many times better ours is (>1: ours wins); × floor: ours",
        "in units of the floor (1.00×: as good as the floor).",
        "",
    ]
    head = (
        f"{'case':<38}{'fs vs tp sp':>12}{'fs vs tp fs':>12}{'sp vs tp sp':>12}{'fs vs anyio':>12}{'× floor':>9}"
    )
    lines += [head, "-" * len(head)]
    for row in report["rows"]:
        case = row["case"]
        lines.append(
            f"{case['label']:<38}{fmt_ratio(row['ours_vs_tp_spawn'], 12)}{fmt_ratio(row['ours_vs_tp_fs'], 12)}"
            f"{fmt_ratio(row['ours_spawn_vs_tp_spawn'], 12)}{fmt_ratio(row['ours_vs_anyio'], 12)}"
            f"{fmt_ratio(row['ours_vs_floor'], 9)}"
        )
    if "map" in report:
        lines += map_bench.render(report["map"])
    if "asyncio" in report:
        lines += ["", *asyncio_bench.HEADER]
        lines += [asyncio_bench.render(asyncio_bench.Row(**row)) for row in report["asyncio"]]
        lines.append(asyncio_bench.FOOTER)
    notes = meta.get("notes", {})
    if "memcheck" in report:
        m = report["memcheck"]
        lines += ["", f"per-job memory check, ours fs, warm call p50: {m['without_us']:.1f} µs without max_memory"]
        labels = {
            "above_rss": "max_memory above the worker's RSS (RSS read only)",
            "mid": "max_memory between the worker's USS and RSS (USS measured every job)",
        }
        for key, label in labels.items():
            if key in m:
                lines.append(
                    f"  {label}: {m[key]['with_us']:.1f} µs, costs {m[key]['cost_us']:+.1f} µs "
                    f"({m[key]['cost_percent']:+.0f}%)"
                )
        worker = notes.get("memcheck_worker")
        if worker:
            lines.append(
                f"  (worker USS {worker['uss_mb']:.1f} MB, RSS {worker['rss_mb']:.1f} MB, mid limit "
                f"{worker['limit_mb']:.1f} MB; slow path taken: {notes.get('memcheck_mid_takes_slow_path')})"
            )
    template = notes.get("template_memory_mb")
    if template:
        lines.append(
            f"our template: RSS {template['rss']:.1f} MB, USS {template['uss']:.1f} MB "
            "(its pages are shared with the workers copy-on-write)"
        )
    startup = notes.get("startup_seconds")
    if startup:
        lines.append(
            "context open (template start + preload where there is one): "
            + ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in startup.items() if seconds > 0.05)
        )
    return "\n".join(lines)


def plot(settings: Settings, report: dict[str, Any], path: str) -> str | None:
    """Write the PNG; return why not if matplotlib is missing."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); no plot written"
    rows = report["rows"]
    panels = len(rows) + (1 if "memcheck" in report else 0)
    if not panels:
        return "no case to plot (the map rows are in the table only)"
    ncols = 3
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(15, 3.2 * nrows), squeeze=False)
    colors = dict(zip(COLUMNS, plt.get_cmap("tab10").colors, strict=False))
    for ax, row in zip(axes.flat, rows, strict=False):
        case = row["case"]
        names = [c for c in COLUMNS if c in row["values"]]
        values = [row["values"][c] for c in names]
        ax.barh([COLUMN_TITLES[n] for n in names], values, color=[colors[n] for n in names])
        ax.invert_yaxis()
        positive = [v for v in values if v > 0]
        if positive and max(positive) / min(positive) > 30:
            ax.set_xscale("log")
            # Minor tick labels of a log axis spanning one or two decades overlap.
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        for y, v in enumerate(values):
            ax.text(v, y, " " + fmt(v, 0).strip(), va="center", fontsize=7)
        ax.margins(x=0.18)  # room for the value labels
        better = "higher is better" if case["higher_better"] else "lower is better"
        ax.set_title(f"{case['label']}\n{case['unit']}, {better}", fontsize=9)
        ax.tick_params(labelsize=8)
    used = len(rows)
    if "memcheck" in report:
        ax = axes.flat[used]
        m = report["memcheck"]
        labels = ["no max_memory"]
        values = [m["without_us"]]
        for key, label in (("above_rss", "limit > RSS"), ("mid", "USS < limit < RSS")):
            if key in m:
                labels.append(label)
                values.append(m[key]["with_us"])
        ax.barh(labels, values, color=[colors["tpf-fs"], "gray", "dimgray"][: len(values)])
        ax.invert_yaxis()
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.0f}", va="center", fontsize=7)
        ax.margins(x=0.18)
        ax.set_title("ours fs: per-job memory check (max_memory)\nwarm call p50, µs, lower is better", fontsize=9)
        ax.tick_params(labelsize=8)
        used += 1
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    fig.suptitle(
        f"trio_parallel_fs vs trio-parallel 1.3.0, anyio, threads and floors "
        f"({'quick' if settings.quick else 'full'} run, {systems.usable_cpus()} CPUs)"
    )
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --- process hygiene -------------------------------------------------------------------------


def leftover_processes(timeout: float) -> list[str]:
    """Descendants of this process still there after ``timeout``: all of them
    were started by this run, so they are killed, and described."""
    me = psutil.Process()
    deadline = time.monotonic() + timeout
    while True:
        left = me.children(recursive=True)
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    described = []
    for proc in left:
        try:
            described.append(f"pid {proc.pid}: {' '.join(proc.cmdline())[:160]}")
            proc.kill()
        except psutil.Error:
            continue
    for proc in left:
        with contextlib.suppress(psutil.Error, ChildProcessError):
            proc.wait(5)
    return described


# --- command line ----------------------------------------------------------------------------


# How much worse than a saved run a case of ours may be before --compare flags
# it. Absolute figures drift run to run on a shared machine; this only catches
# what is clearly a regression, and never runs in CI (nothing there is timed).
REGRESSION_TOLERANCE = 0.15
OUR_COLUMNS = ("tpf-fs", "tpf-spawn")


def regressions(baseline: dict[str, Any], report: dict[str, Any]) -> list[str]:
    """Cases of ours worse than in ``baseline`` by more than the tolerance."""
    before = {row["case"]["label"]: row for row in baseline["report"]["rows"]}
    found = []
    for row in report["rows"]:
        old = before.get(row["case"]["label"])
        if old is None:
            continue
        higher_better = row["case"]["higher_better"]
        for column in OUR_COLUMNS:
            now, then = row["values"].get(column), old["values"].get(column)
            if not now or not then:
                continue
            worse = then / now if higher_better else now / then
            if worse > 1 + REGRESSION_TOLERANCE:
                found.append(
                    f"{row['case']['label']} [{column}]: {now:.4g} {row['case']['unit']} now, "
                    f"{then:.4g} in the baseline ({worse:.2f}x worse)"
                )
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark trio_parallel_fs side by side with trio-parallel 1.3.0, "
        "anyio.to_process, trio.to_thread and this machine's floors. "
        "Needs: pip install '.[bench]' (and matplotlib for the plot).",
    )
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes: about a minute")
    parser.add_argument(
        "--plot", default=os.path.join("bench", "results.png"), help="PNG to write (default %(default)s)"
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write a plot")
    parser.add_argument("--json", metavar="PATH", help="save every sample and the summary as JSON")
    parser.add_argument(
        "--only",
        metavar="NAMES",
        help=f"comma-separated measurements to run (default all): {','.join(MEASUREMENTS)}",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the interleaving order")
    parser.add_argument(
        "--compare",
        metavar="BASELINE",
        help="a JSON file saved by --json: flag every case of ours more than "
        f"{REGRESSION_TOLERANCE * 100:.0f}%% worse than in it (exit status 3 if any)",  # %% for argparse
    )
    args = parser.parse_args(argv)
    if args.only:
        unknown = set(args.only.split(",")) - set(MEASUREMENTS)
        if unknown:
            parser.error(f"unknown measurement(s) {sorted(unknown)}; choose from {MEASUREMENTS}")
    return args


def missing_requirements() -> list[str]:
    missing = []
    for module in ("numpy", "scipy", "trio_parallel", "anyio", "psutil"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    return missing


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_requirements()
    if missing:
        print(
            f"python -m bench needs {', '.join(missing)}: pip install '.[bench]' from the repository",
            file=sys.stderr,
        )
        return 2
    settings = Settings.quick_mode() if args.quick else Settings.full()
    selected = args.only.split(",") if args.only else MEASUREMENTS
    meta = {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpus": systems.usable_cpus(),
        "quick": settings.quick,
        "selected": selected,
        "seed": args.seed,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    start = time.perf_counter()
    try:
        measured = trio.run(measure, settings, selected, args.seed)
        if "asyncio" in selected:
            progress("under asyncio: ours, anyio.to_process, run_in_executor(ProcessPoolExecutor), interleaved")
            measured["asyncio"] = asyncio.run(asyncio_bench.measure(settings.quick))
    finally:
        systems.stop_mp_helpers()
        leftovers = leftover_processes(10.0)
    meta["notes"] = measured["notes"]
    meta["seconds"] = round(time.perf_counter() - start, 1)
    report = build_report(settings, measured)
    print(render(settings, report, meta))
    print(f"\n({meta['seconds']} s)")
    if args.json:
        with open(args.json, "w") as f:
            everything = {"meta": meta, "settings": asdict(settings), "report": report, "samples": measured["data"]}
            json.dump(everything, f, indent=1)
        print(f"JSON written to {args.json}")
    if not args.no_plot:
        why_not = plot(settings, report, args.plot)
        print(why_not or f"plot written to {args.plot}")
    if leftovers:
        print("processes left behind (now killed):\n  " + "\n  ".join(leftovers), file=sys.stderr)
        return 1
    if args.compare:
        with open(args.compare) as f:
            worse = regressions(json.load(f), report)
        if worse:
            print(f"\nworse than {args.compare} by more than {REGRESSION_TOLERANCE:.0%}:\n  " + "\n  ".join(worse))
            return 3
        print(f"\nno case of ours is more than {REGRESSION_TOLERANCE:.0%} worse than in {args.compare}")
    return 0
