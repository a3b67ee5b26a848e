"""``python -m trio_parallel_fs``: a short demonstration with numbers.

Preloads numpy and scipy in a template, fans a batch of numpy/scipy jobs out
over the CPUs, and measures warm-call and fresh-worker latencies next to a
spawn worker's, then prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import trio

import trio_parallel_fs as tpf


def trivial() -> int:
    return 1


def scipy_job(seed: int) -> float:
    import numpy as np
    import scipy.linalg

    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((60, 60))
    return float(abs(scipy.linalg.det(matrix)) ** (1 / 60))


def heavier_scipy_job(seed: int) -> float:
    import numpy as np
    import scipy.linalg

    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((300, 300))
    return float(np.max(np.abs(scipy.linalg.eigvals(matrix))))


def progress(message: str) -> None:
    print(f"  ... {message}", file=sys.stderr, flush=True)


async def median_ms(calls: int, fn: Callable[[], Any]) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def warm_up() -> None:
    """Run once in the template: workers inherit numpy's and BLAS's lazy state."""
    scipy_job(0)


async def measure(worker_type: str, warm_calls: int, fresh_calls: int, batch: int) -> dict[str, float]:
    row: dict[str, float] = {}
    # The job functions live in this module, so preload it too: otherwise each
    # fresh worker would import it (and trio with it) before its first job.
    settings: dict[str, Any] = {
        "worker_type": worker_type,
        "preload": ["numpy", "scipy.linalg", __name__],
        "template_init": warm_up,
    }
    start = time.perf_counter()
    async with tpf.open_worker_context(**settings) as ctx:
        row["start"] = (time.perf_counter() - start) * 1000
        progress(f"{worker_type}: context open in {row['start']:.0f} ms; warm calls")
        await ctx.run_sync(trivial)
        row["warm"] = await median_ms(warm_calls, lambda: ctx.run_sync(trivial))
        progress(f"{worker_type}: batch of {batch} numpy/scipy jobs")
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for seed in range(batch):
                nursery.start_soon(ctx.run_sync, heavier_scipy_job, seed)
        row["batch"] = (time.perf_counter() - start) * 1000
    progress(f"{worker_type}: fresh worker per job (max_jobs=1)")
    async with tpf.open_worker_context(**settings, max_jobs=1) as ctx:
        await ctx.run_sync(scipy_job, 0)
        row["fresh"] = await median_ms(fresh_calls, lambda: ctx.run_sync(scipy_job, 1))
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trio_parallel_fs",
        description=(
            "Run numpy/scipy jobs from Trio in workers forked from a preloaded template, "
            "and compare latencies with spawned workers (fresh interpreters)."
        ),
    )
    parser.add_argument("--warm-calls", type=int, default=300, help="calls timed on a warm worker (default 300)")
    parser.add_argument("--fresh-calls", type=int, default=10, help="single-use workers timed (default 10)")
    parser.add_argument("--batch", type=int, default=16, help="numpy/scipy jobs fanned out at once (default 16)")
    parser.add_argument("--no-spawn", action="store_true", help="skip the spawn backend's column")
    args = parser.parse_args(argv)
    for name in ("warm_calls", "fresh_calls", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def table(rows: dict[str, dict[str, float]]) -> str:
    labels = {
        "start": "context start (template + preload)",
        "warm": "warm call, trivial function (median)",
        "fresh": "fresh worker + numpy/scipy job (median)",
        "batch": "batch of jobs, total wall time",
    }
    names = list(rows)
    lines = [f"{'':42}" + "".join(f"{name:>14}" for name in names)]
    for key, label in labels.items():
        cells = "".join(f"{rows[name][key]:>11.2f} ms" for name in names)
        lines.append(f"{label:42}{cells}")
    if "spawn" in rows:
        ratio = rows["spawn"]["fresh"] / rows["forkserver"]["fresh"]
        lines.append(f"\nA fresh worker from the template is {ratio:.0f}x quicker than a spawned one.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import numpy  # noqa: F401
        import scipy  # noqa: F401
    except ImportError:
        print("The demonstration needs numpy and scipy: pip install 'trio_parallel_fs[demo]'", file=sys.stderr)
        return 2
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"trio_parallel_fs {tpf.__version__} on Python {sys.version.split()[0]}, {cpus} CPUs", flush=True)
    rows = {}
    kinds = ["forkserver"] if args.no_spawn else ["forkserver", "spawn"]
    for kind in kinds:
        rows[kind] = trio.run(measure, kind, args.warm_calls, args.fresh_calls, args.batch)
    print(table(rows))
    return 0
