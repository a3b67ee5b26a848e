"""Big results through the shared memory area, against the socket, in one run.

Run from the repository root::

    python -m bench.bigdata_bench                # every case, about a minute and a half
    python -m bench.bigdata_bench --only first,warm --reps 7

Cases (each one side by side in this run; absolute times drift between runs):

* ``first``: a fresh context's first call returns a 200 MB array. ``area``
  (the default settings) against ``socket`` (``shm_max=0``), a new context
  per sample, taken in turn. The time includes starting the worker; so does
  the socket's.
* ``warm``: an identity job on a 128 MB array, after two untimed calls, the
  caller keeping each result until the next call returns (as ``r = await
  run_sync(f, r)`` does). GB/s counts the array both ways. ``memcpy`` is one
  copy of 128 MB into memory already touched, in this process: the floor of
  one copy.
* ``idle``: in a context in use (two 2 MiB results first), a call returning
  512 MiB, the result dropped, then 15 s idle:
  the memory the context still holds, as ``statistics()`` reports it
  (``shared_memory_bytes`` + ``kept_result_bytes``), for the default idle
  trim and for ``shm_idle=math.inf`` (never trimmed), both
  contexts idle at once.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

MB = 10**6
MiB = 1 << 20


def make(size: int, fill: int) -> object:
    import numpy as np

    return np.full(size, fill, np.uint8)


def identity(value: object) -> object:
    return value


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


async def first_result(reps: int) -> list[str]:
    import trio_parallel_fs as tpf

    samples: dict[str, list[float]] = {"area": [], "socket": []}
    for _ in range(reps):
        for name, settings in (("area", {}), ("socket", {"shm_max": 0})):
            async with tpf.open_worker_context(**settings) as ctx:  # type: ignore[arg-type]
                start = time.perf_counter()
                result = await ctx.run_sync(make, 200 * MB, 1)
                samples[name].append(time.perf_counter() - start)
                del result
    area, sock = _median_ms(samples["area"]), _median_ms(samples["socket"])
    return [
        f"first 200 MB result, fresh context, median of {reps}: area {area:.0f} ms, socket {sock:.0f} ms, "
        f"ratio {area / sock:.2f}x",
        f"  samples ms: area {[round(s * 1e3) for s in samples['area']]}, "
        f"socket {[round(s * 1e3) for s in samples['socket']]}",
    ]


async def warm_round_trip(reps: int) -> list[str]:
    import numpy as np

    import trio_parallel_fs as tpf

    size = 128 * MB
    array = np.ones(size, np.uint8)
    floor_target = np.zeros(size, np.uint8)
    samples: dict[str, list[float]] = {"area": [], "socket": [], "memcpy": []}
    async with tpf.open_worker_context() as area_ctx, tpf.open_worker_context(shm_max=0) as socket_ctx:
        held = {}
        for name, ctx in (("area", area_ctx), ("socket", socket_ctx)):
            for _ in range(2):  # untimed: the area grows, both ends warm up
                held[name] = await ctx.run_sync(identity, array)
        for _ in range(reps):
            for name, ctx in (("area", area_ctx), ("socket", socket_ctx)):
                start = time.perf_counter()
                result = await ctx.run_sync(identity, array)
                samples[name].append(time.perf_counter() - start)
                held[name] = result  # the last result goes only now
                del result
            start = time.perf_counter()
            np.copyto(floor_target, array)
            samples["memcpy"].append(time.perf_counter() - start)
        lent = getattr(area_ctx.statistics(), "lent_result_bytes", 0)
    rates = {name: 2 * size / statistics.median(s) / 1e9 for name, s in samples.items()}
    rates["memcpy"] /= 2  # one copy of 128 MB
    return [
        f"warm 128 MB round trip (identity), median of {reps}: area {rates['area']:.1f} GB/s "
        f"({_median_ms(samples['area']):.1f} ms), socket {rates['socket']:.1f} GB/s, "
        f"memcpy of 128 MB {rates['memcpy']:.1f} GB/s; area/socket {rates['area'] / rates['socket']:.1f}x; "
        f"lent while held: {lent / MiB:.0f} MiB",
    ]


async def idle_memory(seconds: float) -> list[str]:
    import trio

    import trio_parallel_fs as tpf

    def held(ctx: tpf.WorkerContext) -> float:
        stats = ctx.statistics()
        return (stats.shared_memory_bytes + stats.kept_result_bytes) / MiB

    lines = []
    # Commits before shm_idle (issue 26) had no trimming: their "never" is the default.
    never = {"shm_idle": math.inf} if "shm_idle" in tpf.WorkerConfig.__annotations__ else {}
    async with tpf.open_worker_context() as trimmed_ctx, tpf.open_worker_context(**never) as never_ctx:
        for ctx in (never_ctx, trimmed_ctx):
            # A context in use: its worker has an area already (before
            # issue 26 the first large result did not go through one).
            for _ in range(2):
                result = await ctx.run_sync(make, 2 * MiB, 1)
                del result
            result = await ctx.run_sync(make, 512 * MiB, 1)
            del result
        after = {"default": held(trimmed_ctx), "never": held(never_ctx)}
        await trio.sleep(seconds)
        idle = {"default": held(trimmed_ctx), "never": held(never_ctx)}
    lines.append(
        f"held after a 512 MiB result (dropped): default {after['default']:.0f} MiB, never trimmed "
        f"{after['never']:.0f} MiB; after {seconds:.0f} s idle: default {idle['default']:.0f} MiB, "
        f"never trimmed {idle['never']:.0f} MiB"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    import trio

    parser = argparse.ArgumentParser(prog="python -m bench.bigdata_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="first,warm,idle", help="comma-separated: first, warm, idle")
    parser.add_argument("--reps", type=int, default=5, help="timed samples per system (default 5)")
    parser.add_argument("--idle", type=float, default=15.0, help="seconds idle in the idle case (default 15)")
    args = parser.parse_args(argv)
    cases = set(args.only.split(","))
    print(f"python {sys.version.split()[0]}, {os.uname().sysname} {os.uname().release}, {os.cpu_count()} CPUs")

    async def run() -> None:
        if "first" in cases:
            print("\n".join(await first_result(args.reps)), flush=True)
        if "warm" in cases:
            print("\n".join(await warm_round_trip(args.reps)), flush=True)
        if "idle" in cases:
            print("\n".join(await idle_memory(args.idle)), flush=True)

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
