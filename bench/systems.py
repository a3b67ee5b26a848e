"""The systems under comparison, each behind the same small interface.

Every system is an async context manager yielding a `Caller`: ``await
caller.call(fn, *args)`` runs ``fn(*args)`` the way that system does. Used by
the runner (``python -m bench``) and by the pytest-benchmark suites, so both
measure exactly the same thing.

Floors are systems too: the echo process answers any call with a raw
socketpair round trip (what a warm call cannot beat), and the fork helper
reports what fork+exit+waitpid costs in a process that has numpy and scipy
imported (what a fresh worker cannot beat).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from bench import jobs
from trio_parallel_fs._backends.launch import THREAD_LIMIT_VARIABLES

# What every system that can preload gets preloaded: the job module too, as a
# user would preload their own (see README: otherwise each fresh worker imports it).
PRELOAD = ["numpy", "scipy.linalg", "bench.jobs"]

# BLAS thread caps for the processes we start ourselves, as trio_parallel_fs's
# blas_threads=1 does for its template; also keeps the fork floor single-threaded.
BLAS_ENV = {name: "1" for name in THREAD_LIMIT_VARIABLES}


class Caller:
    def __init__(self, run: Callable[..., Awaitable[Any]], **extra: Any) -> None:
        self._run = run
        self.extra = extra

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._run(fn, *args)


async def fan_out(caller: Caller, count: int, fn: Callable[..., Any], *args: Any) -> None:
    """``count`` calls at once; returns when all are done."""
    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(caller.call, fn, *args)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --- trio_parallel_fs ------------------------------------------------------------------


@asynccontextmanager
async def tpf_context(worker_type: str, **config: Any) -> AsyncIterator[Caller]:
    import trio_parallel_fs as tpf

    async with tpf.open_worker_context(worker_type=worker_type, preload=PRELOAD, **config) as ctx:
        yield Caller(ctx.run_sync, context=ctx)


# --- trio-parallel 1.3.0 -------------------------------------------------------------


def use_mp_forkserver_preload(modules: list[str]) -> None:
    """Make multiprocessing's forkserver preload ``modules``.

    The preload list is read when the forkserver starts, once per process: if
    one is already running with another list, stop it so the next worker
    starts a preloaded one.
    """
    from multiprocessing import forkserver

    server = forkserver._forkserver
    if getattr(server, "_preload_modules", None) != modules and getattr(server, "_forkserver_pid", None):
        server._stop()
    multiprocessing.set_forkserver_preload(modules)


def stop_mp_helpers() -> None:
    """Stop multiprocessing's forkserver and resource tracker, which trio-parallel
    leaves running until interpreter exit, so that a run leaves no process behind."""
    from multiprocessing import forkserver, resource_tracker

    for helper in (forkserver._forkserver, resource_tracker._resource_tracker):
        stop = getattr(helper, "_stop", None)
        if stop is not None:
            try:
                stop()
            except (OSError, ChildProcessError):
                pass


@asynccontextmanager
async def trio_parallel_context(worker_type: str, *, fresh: bool = False) -> AsyncIterator[Caller]:
    import trio_parallel

    if worker_type == "forkserver":
        use_mp_forkserver_preload(PRELOAD)
    # trio-parallel has no max_jobs; a retire hook that always says yes makes
    # single-use workers.
    extra = {"retire": jobs.always} if fresh else {}
    async with trio_parallel.open_worker_context(
        worker_type=trio_parallel.WorkerType(worker_type), **extra
    ) as ctx:
        yield Caller(ctx.run_sync, context=ctx)


# --- anyio and threads -------------------------------------------------------------------


@asynccontextmanager
async def anyio_context() -> AsyncIterator[Caller]:
    # anyio keeps one pool per event loop and kills it when the loop ends.
    import anyio.to_process

    yield Caller(anyio.to_process.run_sync)


@asynccontextmanager
async def thread_context() -> AsyncIterator[Caller]:
    yield Caller(trio.to_thread.run_sync)


# --- floors ------------------------------------------------------------------------------

# The echo process: as little as a process can do to answer. -S: no site import.
_ECHO = """
import os, sys
fd = int(sys.argv[1])
while True:
    data = os.read(fd, 1 << 16)
    if not data:
        break
    os.write(fd, data)
"""

# About the size of a pickled trivial job, so the floor moves the same bytes.
ECHO_MESSAGE = b"x" * 64

# The fork helper: numpy and scipy imported, heap frozen as the template does,
# single-threaded; each request byte makes it fork a child that exits at once,
# and it answers with the fork+exit+waitpid time it measured, in ns.
_FORK_HELPER = """
import gc, os, struct, sys, time
import numpy, scipy.linalg
gc.collect()
gc.freeze()
fd = int(sys.argv[1])
os.write(fd, b"R")
while os.read(fd, 1):
    start = time.perf_counter_ns()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    os.write(fd, struct.pack("q", time.perf_counter_ns() - start))
"""


async def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        await trio.lowlevel.wait_readable(sock)
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("the helper process exited")
        data += chunk
    return data


@asynccontextmanager
async def _helper_process(script: str, *flags: str) -> AsyncIterator[socket.socket]:
    ours, theirs = socket.socketpair()
    try:
        proc = await trio.lowlevel.open_process(
            [sys.executable, *flags, "-c", script, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env={**os.environ, **BLAS_ENV},
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    ours.setblocking(False)
    try:
        yield ours
    finally:
        ours.close()  # EOF: the helper's loop ends
        with trio.CancelScope(shield=True):
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


@asynccontextmanager
async def echo_floor() -> AsyncIterator[Caller]:
    """Floor (a): a raw socketpair round trip to an echo process, awaited in Trio."""
    async with _helper_process(_ECHO, "-S") as sock:

        async def round_trip(fn: Callable[..., Any], *args: Any) -> bytes:
            sock.send(ECHO_MESSAGE)  # 64 bytes into an empty socket buffer: never blocks
            return await _recv_exactly(sock, len(ECHO_MESSAGE))

        yield Caller(round_trip)


@asynccontextmanager
async def fork_floor() -> AsyncIterator[Caller]:
    """Floor (b): fork+exit+waitpid of a process with numpy and scipy imported.

    ``call`` returns the helper's own measurement in seconds (the request's
    round trip is not part of the floor).
    """
    async with _helper_process(_FORK_HELPER) as sock:
        await _recv_exactly(sock, 1)  # ready: numpy and scipy are imported

        async def fork_once(fn: Callable[..., Any] = None, *args: Any) -> float:  # type: ignore[assignment]
            sock.send(b"F")
            (nanoseconds,) = struct.unpack("q", await _recv_exactly(sock, 8))
            return nanoseconds / 1e9

        yield Caller(fork_once)


def memcpy_seconds(size: int, repeats: int) -> list[float]:
    """Floor for large arrays: copying ``size`` bytes within this process."""
    import numpy as np

    source = np.ones(size // 8)
    target = np.empty_like(source)
    np.copyto(target, source)  # touch the pages first
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        samples.append(time.perf_counter() - start)
    del source, target
    gc.collect()
    return samples


# --- the registry ------------------------------------------------------------------------

# name -> (label, factory). "fresh" variants make a new worker for every job.
SYSTEMS: dict[str, tuple[str, Callable[[], Any]]] = {
    "tpf-fs": ("trio_parallel_fs forkserver", lambda: tpf_context("forkserver")),
    "tpf-spawn": ("trio_parallel_fs spawn", lambda: tpf_context("spawn")),
    "tp-spawn": ("trio-parallel 1.3.0 spawn", lambda: trio_parallel_context("spawn")),
    "tp-fs": ("trio-parallel 1.3.0 forkserver+preload", lambda: trio_parallel_context("forkserver")),
    "anyio": ("anyio.to_process", anyio_context),
    "thread": ("trio.to_thread", thread_context),
    "tpf-fs-fresh": ("trio_parallel_fs forkserver, max_jobs=1", lambda: tpf_context("forkserver", max_jobs=1)),
    "tpf-spawn-fresh": ("trio_parallel_fs spawn, max_jobs=1", lambda: tpf_context("spawn", max_jobs=1)),
    "tp-spawn-fresh": ("trio-parallel spawn, retire every job", lambda: trio_parallel_context("spawn", fresh=True)),
    "tp-fs-fresh": (
        "trio-parallel forkserver+preload, retire every job",
        lambda: trio_parallel_context("forkserver", fresh=True),
    ),
    "tpf-fs-maxmem": (
        "trio_parallel_fs forkserver, max_memory set",
        lambda: tpf_context("forkserver", max_memory=1 << 40),
    ),
    "echo": ("floor: socketpair echo round trip", echo_floor),
    "fork": ("floor: fork+exit+waitpid (numpy+scipy)", fork_floor),
}
