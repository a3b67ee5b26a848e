"""Warm-call latency of two or more commits of trio_parallel_fs, side by side.

    python -m bench.commits 533bee2 HEAD            # two commits
    python -m bench.commits 533bee2 .               # a commit against this checkout
    python -m bench.commits HEAD~3 HEAD --pin 0     # every process on CPU 0
    python -m bench.commits HEAD /tmp/experiment    # a commit against a tree

Each commit is exported (``git archive``) to a temporary directory and served
by its own process, which runs one ``trio.run`` with a warm worker context and
answers "time N calls" requests. The rounds are interleaved (A, B, A, B...,
in a shuffled order per round) so that the machine's drift and placement luck
fall on every commit alike; the report gives each commit's median and p90 over
all calls, and the ratio to the first commit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs inside each served checkout: a warm context, then timed calls on request.
_SERVER = r"""
import json, operator, sys, time
import trio
import trio_parallel_fs as tpf

async def main():
    async with tpf.open_worker_context() as ctx:
        for _ in range(200):  # warm up: worker, code paths, caches
            await ctx.run_sync(operator.add, 1, 2)
        print("ready", flush=True)
        for line in sys.stdin:
            count = int(line)
            samples = []
            for _ in range(count):
                start = time.perf_counter()
                await ctx.run_sync(operator.add, 1, 2)
                samples.append((time.perf_counter() - start) * 1e6)
            print(json.dumps(samples), flush=True)

trio.run(main)
"""


def export(revision: str, into: Path) -> Path:
    """The tree of ``revision`` (``.`` is this checkout as it is) under ``into``."""
    if revision == ".":
        return ROOT
    if Path(revision).is_dir():  # an exported tree, e.g. with an experiment in it
        return Path(revision).resolve()
    target = into / revision.replace("/", "_")
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def serve(tree: Path, pin: str | None) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    command = [sys.executable, "-c", _SERVER]
    if pin is not None:
        command = ["taskset", "-c", pin, *command]
    process = subprocess.Popen(command, cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"the server for {tree} did not start (said {line!r})")
    return process


def measure(process: subprocess.Popen[str], calls: int) -> list[float]:
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(f"{calls}\n")
    process.stdin.flush()
    samples: list[float] = json.loads(process.stdout.readline())
    return samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revisions", nargs="+", help="commits to compare ('.' is this checkout as it is)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=200, help="calls per round and commit")
    parser.add_argument("--pin", help="run every process on these CPUs (taskset -c)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if len(args.revisions) < 2:
        parser.error("give at least two revisions")
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="tpf-commits-"))
    servers: dict[str, subprocess.Popen[str]] = {}
    samples: dict[str, list[float]] = {revision: [] for revision in args.revisions}
    try:
        for revision in args.revisions:
            servers[revision] = serve(export(revision, workdir), args.pin)
        for _ in range(args.rounds):
            order = list(args.revisions)
            rng.shuffle(order)
            for revision in order:
                samples[revision] += measure(servers[revision], args.calls)
    finally:
        for process in servers.values():
            assert process.stdin is not None
            process.stdin.close()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    first = statistics.median(samples[args.revisions[0]])
    pinned = f"pinned to CPU {args.pin}" if args.pin else "unpinned"
    print(f"warm call, trivial function, {args.rounds} interleaved rounds x {args.calls} calls, {pinned}")
    print(f"{'revision':<12} {'p50 µs':>8} {'p90 µs':>8} {'vs first':>9}")
    for revision, values in samples.items():
        p50 = statistics.median(values)
        p90 = statistics.quantiles(values, n=10)[-1]
        print(f"{revision:<12} {p50:>8.1f} {p90:>8.1f} {p50 / first:>8.2f}x")


if __name__ == "__main__":
    main()
