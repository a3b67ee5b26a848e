"""The contract of run_sync and worker contexts, on both backends."""

from __future__ import annotations

import functools
import inspect
import math
import os
import pickle
import re
import signal
import sys
import threading

import psutil
import pytest
import trio
import workerfns

import trio_parallel_fs as tpf
from _trio_parallel_fs_worker._spin import usable_cpus


async def test_returns_the_value(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        assert await ctx.run_sync(workerfns.add, 2, 3) == 5


async def test_workers_are_reused(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        first = await ctx.run_sync(workerfns.pid)
        second = await ctx.run_sync(workerfns.pid)
        assert first == second != os.getpid()
        stats = ctx.statistics()
        assert (stats.idle_workers, stats.running_workers, stats.started_workers) == (1, 0, 1)


async def test_exception_arrives_with_type_args_and_remote_traceback(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        with pytest.raises(ValueError) as info:
            await ctx.run_sync(workerfns.raise_value_error, "bad value")
        assert info.value.args == ("bad value",)
        cause = info.value.__cause__
        assert isinstance(cause, tpf.RemoteTraceback)
        assert "raise_value_error" in str(cause) and "workerfns.py" in str(cause)
        # The worker survives its job's exception.
        assert await ctx.run_sync(workerfns.add, 1, 1) == 2
        assert ctx.statistics().started_workers == 1


async def test_lambdas_closures_and_partials_travel_by_value(worker_type):
    offset = 10

    def closure(x):
        return x + offset

    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        assert await ctx.run_sync(lambda: 41 + 1) == 42
        assert await ctx.run_sync(closure, 5) == 15
        assert await ctx.run_sync(functools.partial(workerfns.add, b=4), 1) == 5


async def test_no_trio_in_workers(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        loaded = await ctx.run_sync(workerfns.modules_loaded, "trio", "trio_parallel_fs", "outcome")
        assert loaded == {"trio": False, "trio_parallel_fs": False, "outcome": False}


async def test_workers_ignore_sigint(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        assert await ctx.run_sync(workerfns.sigint_handler_is_ignored) is True


async def test_unpicklable_argument_names_it_and_spares_the_worker(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        worker = await ctx.run_sync(workerfns.pid)
        with pytest.raises(pickle.PicklingError, match=r"argument 1 \(lock\)"):
            await ctx.run_sync(workerfns.add, 1, threading.Lock())
        assert await ctx.run_sync(workerfns.pid) == worker


async def test_unpicklable_result_is_a_clear_error_and_the_worker_lives(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        worker = await ctx.run_sync(workerfns.pid)
        with pytest.raises(TypeError, match="result of workerfns.return_unpicklable, a lock, could not be pickled"):
            await ctx.run_sync(workerfns.return_unpicklable)
        assert await ctx.run_sync(workerfns.pid) == worker


@pytest.mark.parametrize(
    "fn, name",
    [(workerfns.raise_needs_two_args, "NeedsTwoArgs"), (workerfns.raise_holds_a_lock, "HoldsALock")],
)
async def test_exception_that_cannot_travel_becomes_a_stand_in(worker_type, fn, name):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        worker = await ctx.run_sync(workerfns.pid)
        with pytest.raises(RuntimeError, match=f"the job raised workerfns.{name}") as info:
            await ctx.run_sync(fn)
        assert "could not travel back" in str(info.value)
        assert name in str(info.value.__cause__)  # the remote traceback names it
        assert await ctx.run_sync(workerfns.pid) == worker


async def test_async_functions_are_refused():
    async def coroutine_function():
        pass

    with pytest.raises(TypeError, match="is an async function"):
        await tpf.run_sync(coroutine_function)
    with pytest.raises(TypeError, match="is an async function"):
        await tpf.run_sync(functools.partial(coroutine_function))
    assert tpf.default_context_statistics().started_workers == 0


async def test_an_object_that_returns_a_coroutine_is_caught_in_the_worker():
    async with tpf.open_worker_context() as ctx:
        with pytest.raises(TypeError, match="returned a coroutine"):
            await ctx.run_sync(AsyncCallable())


class AsyncCallable:
    async def __call__(self):
        pass


async def test_generators_are_refused():
    def generator_function():
        yield 1

    with pytest.raises(TypeError, match="is a generator function"):
        await tpf.run_sync(generator_function)
    async with tpf.open_worker_context() as ctx:
        with pytest.raises(TypeError, match="returned a generator"):
            await ctx.run_sync(workerfns.generator_in_disguise)


async def test_not_callable_is_refused():
    with pytest.raises(TypeError, match="needs a callable"):
        await tpf.run_sync(42)


@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt])
async def test_base_exceptions_from_the_job_come_back_as_raised(exc_type):
    def raiser():
        raise exc_type(3)

    async with tpf.open_worker_context() as ctx:
        worker = await ctx.run_sync(workerfns.pid)
        with pytest.raises(exc_type):
            await ctx.run_sync(raiser)
        assert await ctx.run_sync(workerfns.pid) == worker


async def test_recursion_error_arrives():
    def recurse(n):
        return recurse(n + 1)

    async with tpf.open_worker_context() as ctx:
        with pytest.raises(RecursionError):
            await ctx.run_sync(recurse, 0)
        assert await ctx.run_sync(workerfns.add, 1, 2) == 3


async def test_closed_context_refuses_calls():
    async with tpf.open_worker_context() as ctx:
        pass
    with pytest.raises(trio.ClosedResourceError):
        await ctx.run_sync(workerfns.add, 1, 2)


def test_outside_an_event_loop_is_a_clear_error():
    # (asyncio is supported: tests/test_asyncio.py)
    message = r"inside trio.run or a running asyncio event loop \(asyncio.run, anyio.run\); found no running"
    with pytest.raises(RuntimeError, match=message):
        tpf.current_default_worker_limiter()
    call = tpf.run_sync(workerfns.add, 1, 2)
    with pytest.raises(RuntimeError, match=message):
        call.send(None)


def test_worker_context_is_not_constructed_directly():
    with pytest.raises(TypeError, match="open_worker_context"):
        tpf.WorkerContext(tpf.WorkerConfig())


async def test_default_limiter_is_sized_to_usable_cpus():
    limiter = tpf.current_default_worker_limiter()
    assert limiter is tpf.current_default_process_limiter()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= limiter.total_tokens <= cpus
    assert limiter.total_tokens == max(1, math.ceil(usable_cpus()))


@pytest.mark.parametrize(("cpus", "tokens"), [(1.5, 2), (0.2, 1), (3.0, 3)])
def test_default_limiter_rounds_a_cpu_quota_up(monkeypatch, cpus, tokens):
    """Under a cgroup quota of 1.5 CPUs (usable_cpus says so), two workers."""
    from trio_parallel_fs import _frontend

    monkeypatch.setattr(_frontend, "usable_cpus", lambda: cpus)

    async def size() -> int:
        return tpf.current_default_worker_limiter().total_tokens

    assert trio.run(size) == tokens


async def test_limiter_bounds_concurrency():
    limiter = trio.CapacityLimiter(1)
    async with tpf.open_worker_context() as ctx:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(functools.partial(ctx.run_sync, workerfns.sleep_and_return, 0.05, limiter=limiter))
        # One token: one worker did all three jobs.
        assert ctx.statistics().started_workers == 1


async def test_concurrent_calls_use_several_workers(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        results = []

        async def one(i):
            results.append(await ctx.run_sync(workerfns.sleep_and_return, 0.2, i))

        async with trio.open_nursery() as nursery:
            for i in range(2):
                nursery.start_soon(one, i)
        assert sorted(results) == [0, 1]
        assert ctx.statistics().started_workers == 2


async def test_config_is_readable_on_the_context():
    async with tpf.open_worker_context(idle_timeout=5, worker_type=tpf.WorkerType.SPAWN) as ctx:
        assert ctx.idle_timeout == 5
        assert ctx.worker_type is tpf.WorkerType.SPAWN
        assert ctx.config.grace_period == 30
        with pytest.raises(AttributeError):
            _ = ctx.no_such_setting


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"idle_timeout": -1}, ValueError, "idle_timeout must be non-negative"),
        ({"idle_timeout": "soon"}, TypeError, "idle_timeout must be a number"),
        ({"grace_period": float("nan")}, ValueError, "grace_period must be non-negative"),
        ({"init": 3}, TypeError, "init must be callable"),
        ({"retire": "no"}, TypeError, "retire must be callable"),
        ({"template_init": 5}, TypeError, "template_init must be callable"),
        ({"worker_type": "thread"}, ValueError, "worker_type must be a WorkerType"),
        ({"preload": "numpy"}, TypeError, r"did you mean \['numpy'\]"),
        ({"preload": [".relative"]}, ValueError, "absolute module names"),
        ({"max_jobs": 0}, ValueError, "max_jobs must be at least 1"),
        ({"max_memory": -5}, ValueError, "max_memory must be at least 1"),
        ({"max_jobs_jitter": 2}, ValueError, "max_jobs_jitter needs max_jobs"),
        ({"max_jobs": 2, "max_jobs_jitter": -1}, ValueError, "max_jobs_jitter must be non-negative"),
        ({"max_memory": 1.5}, TypeError, "max_memory must be an int"),
        ({"memory_metric": "vms"}, ValueError, "memory_metric must be one of"),
        ({"blas_threads": True}, TypeError, "blas_threads must be an int"),
        ({"no_such_option": 1}, TypeError, "no_such_option"),
    ],
)
async def test_invalid_configuration_is_refused_at_the_call(kwargs, error, message):
    with pytest.raises(error, match=message):
        async with tpf.open_worker_context(**kwargs):
            pass  # pragma: no cover
    with pytest.raises(error, match=message):
        tpf.configure_default_context(**kwargs)


def test_fork_is_an_alias_of_forkserver():
    assert tpf.WorkerType.FORK is tpf.WorkerType.FORKSERVER
    assert tpf.WorkerType("spawn") is tpf.WorkerType.SPAWN


async def test_statistics_snapshot(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        before = ctx.statistics()
        assert (before.idle_workers, before.running_workers, before.started_workers) == (0, 0, 0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ctx.run_sync, workerfns.sleep_and_return, 0.3)
            await trio.sleep(0.15)
            assert ctx.statistics().running_workers == 1
        after = ctx.statistics()
        assert (after.idle_workers, after.running_workers, after.started_workers) == (1, 0, 1)
        if worker_type == "forkserver":
            assert after.template_pid is not None and psutil.pid_exists(after.template_pid)
        else:
            assert after.template_pid is None


async def test_kill_signal_is_reported(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        with pytest.raises(tpf.BrokenWorkerError) as info:
            # Windows has no SIGKILL: os.kill with SIGTERM is TerminateProcess there.
            await ctx.run_sync(workerfns.kill_self, getattr(signal, "SIGKILL", signal.SIGTERM))
        error = info.value
        if sys.platform == "win32":
            # A terminated process has an exit code (the one TerminateProcess
            # was given), never a signal.
            assert error.signal_name is None and error.exitcode > 0
            assert f"died with exit code {error.exitcode} while running workerfns.kill_self" in str(error)
        else:
            assert error.signal_name == "SIGKILL" and error.exitcode == -signal.SIGKILL
            assert "died with signal SIGKILL while running workerfns.kill_self" in str(error)
        assert error.pid is not None and error.function == "workerfns.kill_self"
        assert error.template_died is False
        assert await ctx.run_sync(workerfns.add, 1, 2) == 3
        assert ctx.statistics().retired == {"died": 1}


def raise_from():
    try:
        {}["key"]
    except KeyError as inner:
        raise ValueError("outer") from inner


def raise_during():
    try:
        {}["key"]
    except KeyError:
        raise ValueError("while handling")  # noqa: B904 - the implicit context is the point


@pytest.mark.parametrize("fn, link", [(raise_from, "__cause__"), (raise_during, "__context__")])
async def test_exception_chain_arrives_with_the_remote_traceback_innermost(fn, link):
    async with tpf.open_worker_context() as ctx:
        with pytest.raises(ValueError) as info:
            await ctx.run_sync(fn)
    inner = getattr(info.value, link)
    assert isinstance(inner, KeyError) and inner.args == ("key",)
    assert isinstance(inner.__cause__, tpf.RemoteTraceback)
    assert fn.__name__ in str(inner.__cause__)


def test_worker_type_accepts_trio_parallel_strings():
    assert tpf.WorkerType("fork") is tpf.WorkerType.FORKSERVER
    assert tpf.WorkerType.SPAWN == "spawn"
    if sys.platform == "win32":  # the string is understood, and refused: no fork there
        with pytest.raises(ValueError, match="FORKSERVER needs os.fork; use WorkerType.SPAWN on Windows"):
            tpf.WorkerConfig(worker_type="fork")
    else:
        assert tpf.WorkerConfig(worker_type="fork").worker_type is tpf.WorkerType.FORKSERVER


def draw_numpy_random():
    import numpy

    return float(numpy.random.random())


async def test_numpy_global_random_state_differs_between_forked_workers():
    pytest.importorskip("numpy")
    async with tpf.open_worker_context(preload=["numpy.random"], max_jobs=1) as ctx:
        draws = {await ctx.run_sync(draw_numpy_random) for _ in range(3)}
    assert len(draws) == 3


def draw_a_normal_in_the_template():
    import numpy

    numpy.random.standard_normal()  # the legacy generator keeps the pair's second value


def draw_numpy_normal():
    import numpy

    return float(numpy.random.standard_normal())


async def test_forked_workers_share_no_numpy_random_state_with_the_template():
    """Not the stream, nor the Gaussian the template's own draw left cached
    (every worker would return that one first)."""
    pytest.importorskip("numpy")
    async with tpf.open_worker_context(
        preload=["numpy.random"], template_init=draw_a_normal_in_the_template, max_jobs=1
    ) as ctx:
        draws = [await ctx.run_sync(draw_numpy_normal) for _ in range(3)]
    assert len(set(draws)) == 3


def checksum(data):
    import zlib

    return len(data), zlib.crc32(data)


async def test_large_arguments_and_results_arrive_intact(worker_type):
    import zlib

    data = bytes(range(256)) * (40 * 2**20 // 256)  # 40 MiB, a pattern that shows misplaced chunks
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        assert await ctx.run_sync(checksum, data) == (len(data), zlib.crc32(data))
        echoed = await ctx.run_sync(bytes, data)
        assert echoed == data
        assert await ctx.run_sync(workerfns.add, 1, 2) == 3


def double_in_place(array):
    array *= 2
    return array


async def test_numpy_arrays_of_every_size_arrive_writable_and_equal(worker_type):
    numpy = pytest.importorskip("numpy")
    async with tpf.open_worker_context(worker_type=worker_type, preload=["numpy"]) as ctx:
        for size in (10, 2**14, 2**17, 2**22):  # in-band, out-of-band small and large
            array = numpy.arange(size, dtype=numpy.float64)
            several = await ctx.run_sync(double_in_place, array)
            assert several.dtype == array.dtype and (several == array * 2).all()
            pair = await ctx.run_sync(tuple, [array, array[::2]])  # a strided view travels in band
            assert (pair[0] == array).all() and (pair[1] == array[::2]).all()


def test_the_configuration_is_documented_in_tiers():
    """WorkerConfig's reference puts first what most users set (trio-parallel's
    five, in their positional order, then preload and the three limits), then
    the tuning knobs; each keyword once (issue 23, item 6)."""
    import attrs

    from trio_parallel_fs._config import POSITIONAL

    # Each attribute's entry starts at the Attributes sections' indent (once
    # the docstring is dedented: Python 3.13 does that itself, 3.10-3.12 not).
    doc = inspect.cleandoc(tpf.WorkerConfig.__doc__ or "")
    documented = re.findall(r"^ {4}(\w+): ", doc, re.MULTILINE)
    first_tier = [*POSITIONAL, "preload", "max_jobs", "max_memory", "memory_ceiling"]
    assert documented[: len(first_tier)] == first_tier
    assert sorted(documented) == sorted(field.name for field in attrs.fields(tpf.WorkerConfig))
