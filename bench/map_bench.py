"""The map rows of ``python -m bench``: many items through one call.

Each row runs the same items through, side by side in one ``trio.run``, in
rounds whose order is shuffled:

- ours: ``ctx.map`` on a forkserver context (default limiter, automatic chunks);
- ``multiprocessing.Pool(cpus).map`` with its default chunksize (forkserver
  processes), called from a thread;
- ``concurrent.futures.ProcessPoolExecutor(cpus).map`` with Pool's chunksize
  (``ceil(len / (4 * cpus))``), called from a thread;
- one ``run_sync`` per item on the same context, fanned out from 1000 tasks
  (on the first ``RUN_SYNC_ITEMS`` items only: it is slow at this).

Items: tiny (``x + 1``), 30 µs of busy CPU each, uneven (10 µs each, 10 ms
for one item in 100 at random places, seeded), and 1 MB numpy arrays (their
sum). Each reports items/s.

Two more figures, ours only: how long ``imap``'s first result takes on a warm
context, in units of a warm ``run_sync``; and an ``imap`` over a generator of
``GENERATOR_ITEMS`` items: how far the input was read ahead of the loop at
most, and how much this process's memory grew.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import random
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import trio

from bench import jobs
from bench.rounds import interleaved

SYSTEMS = ["ours", "pool", "executor", "run_sync"]
TITLES = {"ours": "ours map", "pool": "Pool.map", "executor": "PPE.map", "run_sync": "run_sync/item"}
RUN_SYNC_ITEMS = 5000
RUN_SYNC_TASKS = 1000
MB = 1 << 20


def rows(quick: bool) -> list[tuple[str, str, Callable[..., Any], Callable[[], list[Any]]]]:
    """(key, label, function, items) of each row."""
    scale = 5 if quick else 1
    tiny = 1_000_000 // scale
    busy = 20_000 // scale
    uneven = 10_000 // scale
    arrays = 200 // scale

    def uneven_items() -> list[float]:
        # The slow items at random places (seeded: the same in every run). At
        # regular places (every 100th), every static split of the input holds
        # the same number of them, and any chunking balances.
        rng = random.Random(uneven)
        return [0.01 if rng.random() < 0.01 else 1e-5 for _ in range(uneven)]

    def array_items() -> list[Any]:
        import numpy as np

        return [np.full(MB // 8, float(i)) for i in range(arrays)]

    return [
        ("tiny", f"{tiny:,} tiny items", jobs.tiny_item, lambda: list(range(tiny))),
        ("busy_30us", f"{busy:,} items of 30 µs", jobs.busy_item, lambda: [30e-6] * busy),
        ("uneven", f"{uneven:,} uneven items (~1% 10 ms)", jobs.busy_item, uneven_items),
        ("arrays_1mb", f"{arrays} items of 1 MB arrays", jobs.array_total, array_items),
    ]


def pool_chunksize(items: int, processes: int) -> int:
    """multiprocessing.Pool.map's default chunksize."""
    chunksize, extra = divmod(items, processes * 4)
    return chunksize + 1 if extra else chunksize


async def run_sync_per_item(ctx: Any, fn: Callable[..., Any], items: list[Any]) -> None:
    source: Iterator[Any] = iter(items)

    async def worker() -> None:
        for item in source:
            await ctx.run_sync(fn, item)

    async with trio.open_nursery() as nursery:
        for _ in range(RUN_SYNC_TASKS):
            nursery.start_soon(worker)


async def measure(quick: bool, rng: random.Random, cpus: int, progress: Callable[[str], None]) -> dict[str, Any]:
    import trio_parallel_fs as tpf

    rounds = 1 if quick else 5
    result: dict[str, Any] = {"rows": {}, "cpus": cpus}
    mp = multiprocessing.get_context("forkserver")
    async with tpf.open_worker_context(preload=["numpy", "bench.jobs"]) as ctx:
        with mp.Pool(cpus) as pool, concurrent.futures.ProcessPoolExecutor(cpus, mp_context=mp) as executor:
            # Every worker of every system started and warm.
            await ctx.map(jobs.busy_item, [1e-3] * 8 * cpus, chunksize=1)
            await trio.to_thread.run_sync(pool.map, jobs.busy_item, [1e-3] * 8 * cpus, 1)
            await trio.to_thread.run_sync(lambda: list(executor.map(jobs.busy_item, [1e-3] * 8 * cpus)))
            for key, label, fn, make_items in rows(quick):
                progress(f"map: {label}, {rounds} round(s)")
                rates = await measure_row(ctx, pool, executor, cpus, fn, make_items(), rounds, rng)
                result["rows"][key] = {"label": label, "rates": rates}
            result["first_result"] = await first_result(ctx, rounds * 10)
            result["generator"] = await generator_run(ctx, 10**6 if quick else 10**7)
    return result


async def measure_row(
    ctx: Any,
    pool: Any,
    executor: concurrent.futures.Executor,
    cpus: int,
    fn: Callable[..., Any],
    items: list[Any],
    rounds: int,
    rng: random.Random,
) -> dict[str, list[float]]:
    """items/s of each system over ``items``, ``rounds`` rounds in shuffled orders."""
    per_item = items[:RUN_SYNC_ITEMS]
    chunksize = pool_chunksize(len(items), cpus)

    def executor_map() -> list[Any]:
        return list(executor.map(fn, items, chunksize=chunksize))

    ways = {
        "ours": lambda: ctx.map(fn, items),
        "pool": lambda: trio.to_thread.run_sync(pool.map, fn, items),
        "executor": lambda: trio.to_thread.run_sync(executor_map),
        "run_sync": lambda: run_sync_per_item(ctx, fn, per_item),
    }
    counts = {name: len(per_item) if name == "run_sync" else len(items) for name in ways}
    seconds = await interleaved(ways, rounds, rng)
    return {name: [counts[name] / sample for sample in samples] for name, samples in seconds.items()}


async def first_result(ctx: Any, samples: int) -> dict[str, float]:
    """Seconds to imap's first result, and a warm run_sync's, on the same context."""
    imap_times, call_times = [], []
    for _ in range(samples):
        start = time.perf_counter()
        async with ctx.imap(jobs.tiny_item, range(10**6)) as results:
            async for _ in results:
                imap_times.append(time.perf_counter() - start)
                break
        start = time.perf_counter()
        await ctx.run_sync(jobs.tiny_item, 1)
        call_times.append(time.perf_counter() - start)
    return {"imap": statistics.median(imap_times), "run_sync": statistics.median(call_times)}


async def generator_run(ctx: Any, count: int) -> dict[str, float]:
    """imap over a generator of ``count`` items: the most items read ahead of
    the loop, and this process's largest RSS growth meanwhile (both sampled
    every 65,536 items)."""
    taken = 0

    def source() -> Iterator[int]:
        nonlocal taken
        for i in range(count):
            taken += 1
            yield i

    process = psutil.Process()
    rss_before = process.memory_info().rss
    ahead = 0
    seen = 0
    start = time.perf_counter()
    rss_peak = rss_before
    async with ctx.imap(jobs.tiny_item, source()) as results:
        async for _ in results:
            seen += 1
            if not seen & 0xFFFF:
                ahead = max(ahead, taken - seen)
                rss_peak = max(rss_peak, process.memory_info().rss)
    seconds = time.perf_counter() - start
    return {
        "items": float(count),
        "seconds": seconds,
        "most_read_ahead": float(ahead),
        "rss_growth_mb": (rss_peak - rss_before) / MB,
    }


def summarize(measured: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {"rows": {}, "cpus": measured["cpus"]}
    for key, row in measured["rows"].items():
        medians = {name: statistics.median(values) for name, values in row["rates"].items() if values}
        ratios = {name: medians["ours"] / rate for name, rate in medians.items() if name != "ours" and rate > 0}
        summary["rows"][key] = {"label": row["label"], "items_per_s": medians, "ours_vs": ratios}
    summary["first_result"] = measured["first_result"]
    summary["generator"] = measured["generator"]
    return summary


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def render(summary: dict[str, Any]) -> list[str]:
    cpus = summary["cpus"]
    lines = [
        "",
        f"map: items/s through one call, {cpus} processes each (↑: higher is better). Pool.map: its default "
        "chunksize;",
        "  PPE.map: ProcessPoolExecutor.map with Pool's chunksize; run_sync/item: one run_sync per item from "
        f"{RUN_SYNC_TASKS} tasks,",
        f"  on the first {RUN_SYNC_ITEMS:,} items. Ratios: ours / theirs (>1: ours wins).",
        "",
    ]
    head = f"{'case':<34}" + "".join(f"{TITLES[name]:>15}" for name in SYSTEMS)
    head += "".join(f"{'vs ' + TITLES[name]:>19}" for name in SYSTEMS[1:])
    lines += [head, "-" * len(head)]
    for row in summary["rows"].values():
        cells = "".join(f"{_rate(row['items_per_s'][name]):>15}" for name in SYSTEMS)
        cells += "".join(f"{row['ours_vs'][name]:>18.2f}×" for name in SYSTEMS[1:])
        lines.append(f"{row['label'] + ' ↑':<34}{cells}")
    first = summary["first_result"]
    lines.append(
        f"imap's first result on a warm context: {first['imap'] * 1e6:.0f} µs "
        f"= {first['imap'] / first['run_sync']:.1f}× a warm run_sync ({first['run_sync'] * 1e6:.0f} µs)"
    )
    gen = summary["generator"]
    lines.append(
        f"imap over a generator of {gen['items']:,.0f} items: {gen['items'] / gen['seconds']:,.0f} items/s, "
        f"at most {gen['most_read_ahead']:,.0f} items read ahead of the loop, RSS at most "
        f"{gen['rss_growth_mb']:.1f} MB above its start"
    )
    return lines

