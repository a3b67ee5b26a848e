"""``python -m trio_parallel_fs``: a short demonstration with numbers.

Preloads numpy and scipy in a template, fans a batch of numpy/scipy jobs out
over the CPUs, and measures warm-call and fresh-worker latencies next to a
spawn worker's, then prints a table.

With ``--dask`` it runs the same jobs on a Dask LocalCluster it starts (one
single-threaded worker process per CPU) through ``trio_parallel_fs.dask``.
"""

from __future__ import annotations

import argparse
import logging
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
    parser.add_argument(
        "--warm-calls", type=int, default=None, help="calls timed on a warm worker (default 300; 100 with --dask)"
    )
    parser.add_argument("--fresh-calls", type=int, default=10, help="single-use workers timed (default 10)")
    parser.add_argument("--batch", type=int, default=16, help="numpy/scipy jobs fanned out at once (default 16)")
    parser.add_argument("--no-spawn", action="store_true", help="skip the spawn backend's column")
    parser.add_argument(
        "--dask",
        action="store_true",
        help=(
            "run the jobs on a Dask LocalCluster instead (needs the dask extra: pip install '.[dask]' "
            "from a checkout, pip install 'trio_parallel_fs[dask]' from a package index)"
        ),
    )
    args = parser.parse_args(argv)
    if args.warm_calls is None:
        args.warm_calls = 100 if args.dask else 300
    for name in ("warm_calls", "fresh_calls", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def table(rows: dict[str, dict[str, float]], batch: int) -> str:
    labels = {
        "start": "context start (template + preload)",
        "warm": "warm call, trivial function (median)",
        "fresh": "fresh worker + numpy/scipy job (median)",
        "batch": f"batch of {batch} numpy/scipy jobs, wall time",
    }
    names = list(rows)
    width = max(len(label) for label in labels.values()) + 2
    lines = [f"{'':{width}}" + "".join(f"{name:>14}" for name in names)]
    for key, label in labels.items():
        cells = ""
        for name in names:
            if key == "start" and name == "spawn":
                cells += f"{'(none) *':>14}"
            else:
                cells += f"{rows[name][key]:>11.2f} ms"
        lines.append(f"{label:{width}}{cells}")
    if "spawn" in rows:
        lines.append(
            "\n* spawn has no template: opening its context starts no process, and each worker"
            "\n  pays the interpreter start and the imports, as the fresh-worker row shows."
        )
        ratio = rows["spawn"]["fresh"] / rows["forkserver"]["fresh"]
        lines.append(f"\nA fresh worker from the template is {ratio:.0f}x quicker than a spawned one.")
    return "\n".join(lines)


async def measure_dask(client: Any, warm_calls: int, batch: int) -> dict[str, float]:
    from trio_parallel_fs.dask import open_dask_context

    row: dict[str, float] = {}
    start = time.perf_counter()
    # The workers import numpy, scipy and this module (the jobs) once each.
    async with open_dask_context(client, preload=["numpy", "scipy.linalg", __name__]) as ctx:
        row["open"] = (time.perf_counter() - start) * 1000
        progress(f"dask: context open in {row['open']:.0f} ms; warm calls")
        await ctx.run_sync(trivial)
        row["warm"] = await median_ms(warm_calls, lambda: ctx.run_sync(trivial))
        progress(f"dask: batch of {batch} numpy/scipy jobs")
        await ctx.run_sync(scipy_job, 0)
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for seed in range(batch):
                nursery.start_soon(ctx.run_sync, heavier_scipy_job, seed)
        row["batch"] = (time.perf_counter() - start) * 1000
    return row


def run_dask(workers: int, warm_calls: int, batch: int) -> int:
    try:
        import distributed
    except ImportError:
        print(
            "--dask needs Dask's distributed package, which is not installed here. Install the dask extra: "
            "pip install '.[dask]' from a checkout of trio_parallel_fs, or pip install "
            "'trio_parallel_fs[dask]' where it comes from a package index.",
            file=sys.stderr,
        )
        return 2
    progress(f"dask: starting a LocalCluster of {workers} worker processes")
    start = time.perf_counter()
    dask: Any = distributed  # its constructors are not annotated
    with (
        dask.LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        dask.Client(cluster, set_as_default=False) as client,
    ):
        cluster_ms = (time.perf_counter() - start) * 1000
        row = trio.run(measure_dask, client, warm_calls, batch)
    labels = {
        "cluster": "LocalCluster start",
        "open": "context open (preload on every worker)",
        "warm": "warm call, trivial function (median)",
        "batch": f"batch of {batch} numpy/scipy jobs, wall time",
    }
    row["cluster"] = cluster_ms
    width = max(len(label) for label in labels.values()) + 2
    print(f"Dask LocalCluster: {workers} worker processes x 1 thread, jobs through its scheduler")
    for key, label in labels.items():
        print(f"{label:{width}}{row[key]:>11.2f} ms")
    return 0


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
    if args.dask:
        return run_dask(cpus or 1, args.warm_calls, args.batch)
    rows = {}
    kinds = ["forkserver"] if args.no_spawn else ["forkserver", "spawn"]
    for kind in kinds:
        rows[kind] = trio.run(measure, kind, args.warm_calls, args.fresh_calls, args.batch)
    print(table(rows, args.batch))
    return 0
