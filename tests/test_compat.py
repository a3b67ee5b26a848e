"""A program written for trio-parallel runs with only its import line changed."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import pytest

import trio_parallel_fs

# trio-parallel 1.3.0's public names, keywords and statistics fields.
TRIO_PARALLEL_NAMES = {
    "run_sync",
    "open_worker_context",
    "cache_scope",
    "WorkerContext",
    "WorkerType",
    "current_default_worker_limiter",
    "configure_default_context",
    "default_context_statistics",
    "BrokenWorkerError",
}

PROGRAM = """
import math, os, time
import trio
import trio_parallel_fs as trio_parallel   # the only line that changes

def work(x):
    return x * 2

def retire_after_one():
    return True

async def main():
    assert trio_parallel.current_default_worker_limiter().total_tokens >= 1
    print("run_sync", await trio_parallel.run_sync(work, 21))
    print("kwargs", await trio_parallel.run_sync(work, 1, kill_on_cancel=True, limiter=trio.CapacityLimiter(1)))
    print("cancellable", await trio_parallel.run_sync(work, 2, cancellable=True))
    stats = trio_parallel.default_context_statistics()
    print("stats", stats.idle_workers, stats.running_workers)
    # positional arguments, in trio-parallel's order
    async with trio_parallel.open_worker_context(math.inf, bool, retire_after_one, 5.0,
                                                 trio_parallel.WorkerType.SPAWN) as ctx:
        assert isinstance(ctx, trio_parallel.WorkerContext)
        print("ctx", await ctx.run_sync(work, 4), ctx.statistics().idle_workers)
    async with trio_parallel.cache_scope(idle_timeout=10, worker_type=trio_parallel.WorkerType.{forkserver}):
        print("scope", await trio_parallel.run_sync(work, 5))
    with trio.move_on_after(0.2):
        await trio_parallel.run_sync(time.sleep, 30, kill_on_cancel=True)
    try:
        await trio_parallel.run_sync(os._exit, 3)
    except trio_parallel.BrokenWorkerError as exc:
        print("broken", isinstance(exc, RuntimeError))

if __name__ == "__main__":
    trio_parallel.configure_default_context(600, bool, bool, 30, trio_parallel.WorkerType.{fork})
    trio.run(main)
"""


def test_trio_parallel_program_runs_with_the_import_changed(tmp_path):
    # trio-parallel has no FORK or FORKSERVER member on Windows (no such start
    # method there), so its programs for Windows name SPAWN.
    fork, forkserver = ("SPAWN", "SPAWN") if sys.platform == "win32" else ("FORK", "FORKSERVER")
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(PROGRAM).format(fork=fork, forkserver=forkserver))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:-1] == [
        "run_sync 42",
        "kwargs 2",
        "cancellable 4",
        "stats 1 0",
        "ctx 8 0",
        "scope 10",
        "broken True",
    ]


def test_every_public_name_of_trio_parallel_exists():
    missing = {name for name in TRIO_PARALLEL_NAMES if not hasattr(trio_parallel_fs, name)}
    assert not missing


def test_names_match_the_installed_trio_parallel_if_present():
    trio_parallel = pytest.importorskip("trio_parallel")
    theirs = {name for name in dir(trio_parallel) if not name.startswith("_")}
    assert theirs - set(dir(trio_parallel_fs)) == set()
    for name in ("run_sync",):
        their_params = set(inspect.signature(getattr(trio_parallel, name)).parameters)
        our_params = set(inspect.signature(getattr(trio_parallel_fs, name)).parameters)
        assert their_params <= our_params


def test_positional_arguments_are_capped():
    with pytest.raises(TypeError, match="at most 5 positional arguments"):
        trio_parallel_fs.configure_default_context(1, bool, bool, 1, "spawn", ["numpy"])
    with pytest.raises(TypeError, match="multiple values for argument 'idle_timeout'"):
        trio_parallel_fs.configure_default_context(1, idle_timeout=2)
