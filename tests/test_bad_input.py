"""Bad input: each kind gets a clear error (type and message checked), and the
pool keeps working afterwards, on the same worker where the worker was not at
fault (checked by pid).

test_run_sync.py already covers the basic cases (an unpicklable argument or
result, exceptions that cannot travel, async and generator functions, a
non-callable, outside Trio, a closed context, invalid configuration); these
tests cover what it does not, and the "pool keeps working" side of each.
"""

from __future__ import annotations

import functools
import os
import pickle
import subprocess
import sys
import threading
import uuid
import zlib

import pytest
import trio
import workerfns

import trio_parallel_fs as tpf

HERE = os.path.dirname(os.path.abspath(__file__))


class HoldsALockCallable:
    def __init__(self):
        self.lock = threading.Lock()

    def __call__(self):
        return "unreachable"


async def same_worker_after(ctx, check):
    """Run ``check`` (an awaitable factory) between two pid probes; assert both
    probes ran on the same worker."""
    before = await ctx.run_sync(workerfns.pid)
    await check()
    after = await ctx.run_sync(workerfns.pid)
    assert before == after, "the worker was replaced"
    stats = ctx.statistics()
    assert (stats.started_workers, stats.retired) == (1, {})


# --- what cannot be sent ------------------------------------------------------------


async def test_unpicklable_function_is_named(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:

        async def check():
            with pytest.raises(
                pickle.PicklingError,
                match=r"cannot send .*HoldsALockCallable.* to a worker: the function \(HoldsALockCallable\) "
                r"could not be pickled \(TypeError: cannot pickle '_thread.lock' object\)",
            ):
                await ctx.run_sync(HoldsALockCallable())

        await same_worker_after(ctx, check)


async def test_closure_over_something_unpicklable_is_named(worker_type):
    lock = threading.Lock()

    def uses_the_lock():
        return lock.locked()

    async with tpf.open_worker_context(worker_type=worker_type) as ctx:

        async def check():
            with pytest.raises(
                pickle.PicklingError, match=r"uses_the_lock to a worker: the function \(function\) could not be pickled"
            ):
                await ctx.run_sync(uses_the_lock)

        await same_worker_after(ctx, check)


async def test_unpicklable_keyword_in_a_partial_is_named(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:

        async def check():
            with pytest.raises(
                pickle.PicklingError,
                match=r"cannot send workerfns\.add to a worker: the function \(partial\) could not be pickled",
            ):
                await ctx.run_sync(functools.partial(workerfns.add, b=threading.Lock()), 1)

        await same_worker_after(ctx, check)


async def test_argument_too_deeply_nested_to_pickle_is_named(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:

        async def check():
            with pytest.raises(
                pickle.PicklingError,
                match=r"workerfns\.depth_of to a worker: argument 0 \(list\) could not be pickled .*recursion",
            ):
                await ctx.run_sync(workerfns.depth_of, workerfns.nested_list(100_000))
            # A deep but manageable one goes through.
            assert await ctx.run_sync(workerfns.depth_of, workerfns.nested_list(200)) == 200

        await same_worker_after(ctx, check)


async def test_argument_that_fails_to_unpickle_in_the_worker(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:

        async def check():
            with pytest.raises(ValueError, match="this object refuses to be unpickled") as info:
                await ctx.run_sync(workerfns.add, workerfns.ExplodesWhenLoaded(), 1)
            assert isinstance(info.value.__cause__, tpf.RemoteTraceback)
            assert "_explode" in str(info.value.__cause__)

        await same_worker_after(ctx, check)


async def test_function_from_a_module_the_worker_cannot_import(worker_type, tmp_path, monkeypatch):
    """A module made importable in the parent after the worker started."""
    name = f"late_module_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text("def triple(x):\n    return 3 * x\n")
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        before = await ctx.run_sync(workerfns.pid)
        monkeypatch.syspath_prepend(str(tmp_path))
        module = __import__(name)
        try:
            assert module.triple(2) == 6  # fine here
            with pytest.raises(ModuleNotFoundError, match=f"No module named '{name}'") as info:
                await ctx.run_sync(module.triple, 2)
            assert isinstance(info.value.__cause__, tpf.RemoteTraceback)
            assert await ctx.run_sync(workerfns.pid) == before
        finally:
            del sys.modules[name]


async def test_function_its_module_no_longer_names_is_sent_by_value(worker_type, monkeypatch):
    original = workerfns.add
    monkeypatch.setattr(workerfns, "add", lambda a, b: "replaced")
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        assert await ctx.run_sync(original, 1, 2) == 3


# --- what cannot come back ---------------------------------------------------------------


async def test_result_that_fails_to_unpickle_in_the_parent(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:

        async def check():
            with pytest.raises(
                TypeError,
                match=r"the result of workerfns\.return_worker_only_value could not be unpickled in the parent: "
                r"ImportError: WorkerOnlyValue can only be rebuilt in process",
            ) as info:
                await ctx.run_sync(workerfns.return_worker_only_value)
            assert isinstance(info.value.__cause__, ImportError)

        await same_worker_after(ctx, check)


async def test_result_too_deeply_nested_to_pickle(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:

        async def check():
            with pytest.raises(
                TypeError,
                match=r"the result of workerfns.nested_list, a list, could not be pickled to leave the worker: "
                r".*recursion",
            ):
                await ctx.run_sync(workerfns.nested_list, 100_000)

        await same_worker_after(ctx, check)


async def test_exception_that_fails_to_unpickle_in_the_parent(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:

        async def check():
            with pytest.raises(
                RuntimeError, match=r"the job raised workerfns\.WorkerOnlyError: from a module the parent cannot import"
            ) as info:
                await ctx.run_sync(workerfns.raise_worker_only_error)
            assert isinstance(info.value.__cause__, tpf.RemoteTraceback)
            assert "raise_worker_only_error" in str(info.value.__cause__)

        await same_worker_after(ctx, check)


async def test_exception_with_unpicklable_args_becomes_a_stand_in(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:

        async def check():
            with pytest.raises(
                RuntimeError,
                match=r"the job raised builtins\.ValueError: \('has a lock in its args', .*lock.*\), which could not "
                r"travel back from the worker \(TypeError: cannot pickle '_thread.lock' object\)",
            ) as info:
                await ctx.run_sync(workerfns.raise_with_unpicklable_args)
            assert "raise_with_unpicklable_args" in str(info.value.__cause__)

        await same_worker_after(ctx, check)


async def test_exception_that_cannot_be_pickled_nor_printed(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:

        async def check():
            with pytest.raises(
                RuntimeError, match=r"the job raised workerfns\.UnpicklableAndUnprintable.*which could not travel back"
            ) as info:
                await ctx.run_sync(workerfns.raise_unpicklable_and_unprintable)
            assert not isinstance(info.value, tpf.BrokenWorkerError)

        await same_worker_after(ctx, check)


# --- what the job raises ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn, args, error, check",
    [
        (sys.exit, (5,), SystemExit, lambda e: e.code == 5),
        (workerfns.raise_system_exit, (None,), SystemExit, lambda e: e.code is None),
        (workerfns.raise_keyboard_interrupt, (), KeyboardInterrupt, lambda e: e.args == ("raised by the job",)),
        (workerfns.recurse_forever, (), RecursionError, lambda e: "maximum recursion depth exceeded" in str(e)),
        (workerfns.allocate_too_much, (), MemoryError, lambda e: True),
    ],
    ids=["sys.exit", "SystemExit", "KeyboardInterrupt", "RecursionError", "MemoryError"],
)
async def test_base_exceptions_and_resource_errors_from_the_job(worker_type, fn, args, error, check):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:

        async def run_it():
            with pytest.raises(error) as info:
                await ctx.run_sync(fn, *args)
            assert type(info.value) is error and check(info.value)
            assert isinstance(info.value.__cause__, tpf.RemoteTraceback)

        await same_worker_after(ctx, run_it)


# --- what is not a sync function ------------------------------------------------------------


async def coroutine_function():
    pass  # pragma: no cover


async def async_generator_function():
    yield  # pragma: no cover


def generator_function():
    yield  # pragma: no cover


@pytest.mark.parametrize(
    "fn, message",
    [
        (coroutine_function, "coroutine_function is an async function; run_sync runs synchronous functions"),
        (async_generator_function, "async_generator_function is an async function"),
        (functools.partial(coroutine_function), "coroutine_function is an async function"),
        (generator_function, "generator_function is a generator function; its generator cannot leave the worker"),
        (42, "run_sync needs a callable, not int 42"),
    ],
    ids=["coroutine", "async-generator", "partial-of-coroutine", "generator", "not-callable"],
)
async def test_not_a_sync_function_is_refused_before_reaching_a_worker(worker_type, fn, message):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:

        async def check():
            with pytest.raises(TypeError, match=message):
                await ctx.run_sync(fn)

        await same_worker_after(ctx, check)


async def test_keyword_arguments_for_the_job_are_refused_with_the_fix():
    expected = (
        r"run_sync passes positional arguments only, and got keyword arguments for the job \(b=\)\. "
        r"Bind them first: run_sync\(functools\.partial\(workerfns\.add, b=b\), \*args\)"
    )
    async with tpf.open_worker_context() as ctx:
        with pytest.raises(TypeError, match=expected):
            await ctx.run_sync(workerfns.add, 1, b=2)
        with pytest.raises(TypeError, match=expected):
            await tpf.run_sync(workerfns.add, 1, b=2)
        assert ctx.statistics().started_workers == 0


@pytest.mark.parametrize(
    ("call", "function"),
    [
        (lambda: tpf.open_worker_context(max_job=3), "open_worker_context"),
        (lambda: tpf.cache_scope(max_job=3), "cache_scope"),
    ],
)
async def test_a_misspelt_setting_names_the_function_and_the_closest_keyword(call, function):
    with pytest.raises(
        TypeError, match=rf"^{function}\(\) got an unexpected keyword argument 'max_job'; did you mean max_jobs\?$"
    ):
        async with call():
            pass


def test_configure_default_context_suggests_the_closest_keyword_too():
    with pytest.raises(
        TypeError,
        match=r"configure_default_context\(\) got an unexpected keyword argument 'idle_timout'; "
        r"did you mean idle_timeout\?",
    ):
        tpf.configure_default_context(idle_timout=3)
    with pytest.raises(
        TypeError, match=r"got an unexpected keyword argument 'colour'; the keywords are idle_timeout, init"
    ):
        tpf.configure_default_context(colour="blue")


async def test_a_limiter_that_is_not_one_is_refused():
    async with tpf.open_worker_context() as ctx:
        expected = (
            "limiter must be a trio.CapacityLimiter, an anyio.CapacityLimiter, an asyncio.Semaphore or "
            "another async context manager, not int 3"
        )
        with pytest.raises(TypeError, match=expected):
            await ctx.run_sync(workerfns.add, 1, 2, limiter=3)
        assert ctx.statistics().started_workers == 0
        assert await ctx.run_sync(workerfns.add, 1, 2) == 3


# --- big data -------------------------------------------------------------------------------


def pattern_crc(size):
    """zlib.crc32 of workerfns.pattern(size), without making the pattern."""
    chunk = bytes(workerfns.pattern(251 * 4096))
    crc = 0
    whole, rest = divmod(size, len(chunk))
    for _ in range(whole):
        crc = zlib.crc32(chunk, crc)
    return zlib.crc32(chunk[:rest], crc)


async def test_one_gib_result_arrives_intact():
    size = 2**30
    async with tpf.open_worker_context() as ctx:
        worker = await ctx.run_sync(workerfns.pid)
        with trio.fail_after(120):
            data = await ctx.run_sync(workerfns.pattern, size)
        assert type(data) is bytearray and len(data) == size
        expected_crc = pattern_crc(size)
        for offset in (0, 250, 251, 2**20 + 17, size // 2, size - 251, size - 1):
            assert data[offset] == offset % 251
        assert zlib.crc32(data) == expected_crc
        del data
        assert await ctx.run_sync(workerfns.pid) == worker


async def test_256_mib_argument_arrives_intact(worker_type):
    data = workerfns.pattern(2**28)
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:

        async def check():
            with trio.fail_after(120):
                assert await ctx.run_sync(workerfns.length_and_crc, data) == (len(data), zlib.crc32(data))

        await same_worker_after(ctx, check)


# --- functions, results and exceptions defined in __main__ -------------------------------------

MAIN_SCRIPT = """
import sys, trio, trio_parallel_fs as tpf

class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

class MainError(Exception):
    pass

def make_point(x):
    return Point(x, x + 1)

def fail(message):
    raise MainError(message)

async def main():
    async with tpf.open_worker_context(worker_type=sys.argv[1]) as ctx:
        point = await ctx.run_sync(make_point, 4)
        print("point", type(point) is Point, point.x, point.y)
        try:
            await ctx.run_sync(fail, "from main")
        except MainError as exc:
            print("caught", type(exc) is MainError, exc)
        print("lambda", await ctx.run_sync(lambda: Point(1, 2).y))
        print("workers", ctx.statistics().started_workers)

trio.run(main)
"""


def test_classes_and_exceptions_defined_in_main_round_trip(worker_type, tmp_path):
    script = tmp_path / "main_script.py"
    script.write_text(MAIN_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), worker_type], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["point True 4 5", "caught True from main", "lambda 2", "workers 1"]


# --- invalid context arguments ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"grace_period": -1}, ValueError, r"grace_period must be non-negative .*not -1"),
        ({"idle_timeout": -0.5}, ValueError, r"idle_timeout must be non-negative"),
        ({"idle_timeout": float("-inf")}, ValueError, r"idle_timeout must be non-negative"),
        ({"idle_timeout": True}, TypeError, r"idle_timeout must be a number, not bool"),
        ({"grace_period": None}, TypeError, r"grace_period must be a number, not NoneType"),
        ({"init": None}, TypeError, r"init must be callable without arguments, not NoneType"),
        ({"retire": 0}, TypeError, r"retire must be callable"),
        ({"worker_type": 3}, ValueError, r"worker_type must be a WorkerType or one of .*'spawn', not 3"),
        ({"worker_type": None}, ValueError, r"worker_type must be a WorkerType"),
        ({"worker_type": "FORKSERVER"}, ValueError, r"not 'FORKSERVER'"),
        ({"preload": 42}, TypeError, r"preload must be a list of module names, not 42"),
        ({"preload": [None]}, ValueError, r"preload entries must be absolute module names, not None"),
        ({"preload": [""]}, ValueError, r"preload entries must be absolute module names, not ''"),
        ({"max_jobs": 1.5}, TypeError, r"max_jobs must be an int or None"),
        ({"max_jobs": True}, TypeError, r"max_jobs must be an int or None"),
        ({"max_jobs": -1}, ValueError, r"max_jobs must be at least 1"),
        ({"memory_ceiling": 0}, ValueError, r"memory_ceiling must be at least 1"),
        ({"memory_ceiling": -(2**30)}, ValueError, r"memory_ceiling must be at least 1"),
        ({"memory_ceiling": "1G"}, TypeError, r"memory_ceiling must be an int or None"),
        ({"max_memory": 0}, ValueError, r"max_memory must be at least 1"),
        ({"memory_metric": None}, ValueError, r"memory_metric must be one of"),
        ({"blas_threads": 0}, ValueError, r"blas_threads must be at least 1"),
        ({"busy_wait": -0.001}, ValueError, r"busy_wait must be non-negative"),
        ({"busy_wait": 0.5}, ValueError, r"busy_wait must be at most 0.01 seconds \(it spins a CPU .*not 0.5"),
        ({"busy_wait": float("inf")}, ValueError, r"busy_wait must be at most 0.01 seconds"),
        ({"busy_wait": "200us"}, TypeError, r"busy_wait must be a number, not str"),
    ],
)
async def test_more_invalid_configuration_is_refused_and_the_default_context_survives(kwargs, error, message):
    worker = await tpf.run_sync(workerfns.pid)
    with pytest.raises(error, match=message):
        async with tpf.open_worker_context(**kwargs):
            pass  # pragma: no cover
    with pytest.raises(error, match=message):
        tpf.configure_default_context(**kwargs)
    # The default context kept its configuration and its worker.
    assert await tpf.run_sync(workerfns.pid) == worker


# --- outside Trio, and after the context closed -------------------------------------------------


def test_outside_trio_every_entry_point_says_so():
    with pytest.raises(RuntimeError, match="must be used inside trio.run"):
        tpf.current_default_worker_limiter()
    coroutine = tpf.run_sync(workerfns.add, 1, 2)
    with pytest.raises(RuntimeError, match="must be used inside trio.run"):
        coroutine.send(None)
    coroutine.close()
    # Statistics need no Trio, and nothing was started.
    assert tpf.default_context_statistics().started_workers == 0


def test_a_context_opened_in_one_trio_run_serves_another_in_a_thread():
    """The pool holds no Trio objects: a context is not tied to the run that opened it."""
    results = []

    async def main():
        async with tpf.open_worker_context() as ctx:
            worker = await ctx.run_sync(workerfns.pid)

            def other_run():
                results.append(trio.run(ctx.run_sync, workerfns.pid))

            await trio.to_thread.run_sync(other_run)
            results.append(worker)

    trio.run(main)
    assert len(results) == 2 and results[0] == results[1]


async def test_closed_context_says_so_and_starts_nothing(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        await ctx.run_sync(workerfns.add, 1, 2)
    with pytest.raises(trio.ClosedResourceError, match="this worker context is closed"):
        await ctx.run_sync(workerfns.add, 1, 2)
    stats = ctx.statistics()
    assert (stats.idle_workers, stats.started_workers) == (0, 1)


async def test_a_call_waiting_for_the_limiter_when_the_context_closes():
    limiter = trio.CapacityLimiter(1)
    errors = []
    async with trio.open_nursery() as outer:

        async def hold_the_limiter():
            async with limiter:
                await trio.sleep(0.3)

        outer.start_soon(hold_the_limiter)
        await trio.sleep(0.05)
        async with tpf.open_worker_context() as ctx:

            async def waiting_call():
                try:
                    await ctx.run_sync(workerfns.add, 1, 2, limiter=limiter)
                except trio.ClosedResourceError as exc:
                    errors.append(exc)

            outer.start_soon(waiting_call)
            await trio.sleep(0.05)
        # The context closed while the call waited for a token.
    assert len(errors) == 1
    assert str(errors[0]) == "this worker context closed while the call waited"
    assert ctx.statistics().started_workers == 0
