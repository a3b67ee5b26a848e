"""A burst of single-use numpy/scipy jobs beside its CPU floor, in one run.

Run from the repository root::

    python -m bench.burst_bench                 # 8 jobs, 15 rounds
    python -m bench.burst_bench --jobs 8 --rounds 25
    python -m bench.burst_bench --gap 0         # bursts back to back

Each round, in a shuffled order: ``burst``, ``--jobs`` concurrent calls of
``bench.jobs.numpy_scipy_job`` in a forkserver context with ``max_jobs=1``
(every job on a fresh worker; the pool prepares replacements, as in use);
and ``floor``, that many fork+exit+waitpid of a process with numpy and scipy
imported (each measured inside the helper), summed and divided by the CPUs:
the least CPU time the burst could take if nothing but its forks and exits
cost anything. Between rounds the machine settles for ``--gap`` seconds
(0.3 by default), so that the workers of one round have exited before the
next: a burst after a quiet moment, where the successors of the last burst's
workers and the template's spares were prepared while the CPUs were idle.
With ``--gap 0`` each burst follows the last at once, and pays for what
that left to do.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time


async def run(jobs_count: int, rounds: int, seed: int, gap: float = 0.3) -> list[str]:
    import trio

    from . import jobs, systems

    cpus = systems.usable_cpus()
    bursts: list[float] = []
    floors: list[float] = []
    rng = random.Random(seed)
    async with systems.tpf_context("forkserver", max_jobs=1) as ours, systems.fork_floor() as fork:
        await systems.fan_out(ours, jobs_count, jobs.numpy_scipy_job, 0)  # untimed: the template warms up
        await trio.sleep(0.3)
        for _ in range(rounds):
            order = ["burst", "floor"]
            rng.shuffle(order)
            for name in order:
                if name == "burst":
                    start = time.perf_counter()
                    await systems.fan_out(ours, jobs_count, jobs.numpy_scipy_job, 2)
                    bursts.append(time.perf_counter() - start)
                else:
                    floors.append(sum([float(await fork.call(None)) for _ in range(jobs_count)]) / cpus)
                await trio.sleep(gap)
    burst, floor = statistics.median(bursts) * 1e3, statistics.median(floors) * 1e3
    return [
        f"{jobs_count} concurrent single-use numpy/scipy jobs, median of {rounds} ({gap:g} s apart): {burst:.1f} ms; "
        f"CPU floor ({jobs_count} forks+exits / {cpus} CPUs) {floor:.1f} ms; ratio {burst / floor:.2f}x",
        f"  burst ms: {sorted(round(b * 1e3, 1) for b in bursts)}",
    ]


def main(argv: list[str] | None = None) -> int:
    import trio

    parser = argparse.ArgumentParser(prog="python -m bench.burst_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gap", type=float, default=0.3, help="seconds between two bursts (default 0.3)")
    args = parser.parse_args(argv)
    print("\n".join(trio.run(run, args.jobs, args.rounds, args.seed, args.gap)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
