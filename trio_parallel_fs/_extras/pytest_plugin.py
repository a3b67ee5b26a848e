"""pytest plugin: the ``worker_context`` and ``trio_benchmark`` fixtures.

Users' documentation is the "Testing and profiling with pytest" page
(docs/testing.rst); this docstring is for whoever changes the plugin.

It loads through the package's ``pytest11`` entry point into **every** pytest
session of every environment where trio_parallel_fs is installed, whether the
session uses its fixtures or not. So importing this module costs next to
nothing: Trio, psutil, pytest-benchmark and the package's own machinery are
imported inside the fixtures, when a test asks for one (pytest is already
imported when pytest loads a plugin). tests/test_pytest_plugin.py checks this.

``worker_context`` opens a context in its setup and, at teardown, closes it and
fails the test if any process of the context outlives it: its template, its
workers (learned through `_introspect.watch_workers` as they start) and every
process below the template and the workers when the context closes (from
`_introspect.context_processes`). Each is held as a psutil handle, which checks
the process's creation time, so a reused pid is never mistaken for (or killed
as) a leftover. The fixture is synchronous on purpose: a context is not tied to
a ``trio.run``, so the same fixture serves pytest-trio tests, anyio's trio
backend, and plain tests that call ``trio.run`` themselves.

``trio_benchmark`` drives pytest-benchmark, whose loop blocks its thread, from a
worker thread (``trio.to_thread``); each iteration hands the call back to the
test's Trio loop with ``trio.from_thread.run``. The hand-offs must not be timed,
so pytest-benchmark is given a clock of awaited time (`AwaitedTime`) through its
public ``benchmark`` marker (``timer=``) instead of ``perf_counter``.

pytest-benchmark sorts tests into benchmarks and others when they are
collected (for ``--benchmark-only``, ``--benchmark-skip``), by whether
``benchmark`` is among a test's fixture names; ``trio_benchmark`` asks for it
only while the test sets up, too late for that. So the plugin's collection hook
(run before pytest-benchmark's) adds ``benchmark`` to the fixture names of each
test that uses ``trio_benchmark``, and hands the test its clock through the
marker there and then, so the order in which the two fixtures are set up does
not matter.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import psutil

    from .._frontend import WorkerContext

MARKER = "worker_context"
DEFAULT_LEAK_TIMEOUT = 5.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(**config): configure the worker_context fixture with the keywords of "
        "trio_parallel_fs.WorkerConfig (an indirect parameter overrides them)",
    )


# --- worker_context ---------------------------------------------------------------


def _requested_config(request: pytest.FixtureRequest) -> dict[str, Any]:
    config: dict[str, Any] = {}
    # Closest marker last, so that a function's marker overrides its class's.
    for marker in reversed(list(request.node.iter_markers(MARKER))):
        if marker.args:
            raise pytest.UsageError(f"@pytest.mark.{MARKER} takes keywords only, got {marker.args!r}")
        config.update(marker.kwargs)
    param = getattr(request, "param", None)
    if param is not None:
        if not isinstance(param, dict):
            raise pytest.UsageError(
                f"indirect parameters of worker_context must be dicts of WorkerConfig "
                f"keywords, not {param!r}"
            )
        config.update(param)
    return config


class _ProcessTracker:
    """Remembers every process of a context, as psutil handles.

    A psutil.Process remembers its pid's creation time, so a handle never
    mistakes (or kills) an unrelated process that reused the pid. Handles are
    taken while the process cannot have been reaped yet: each worker as soon as
    its pid is known (only the pool reaps spawned workers; only the template
    reaps forked ones), and the template and everything below it and below the
    workers just before the context closes (only the parent reaps the template).
    """

    def __init__(self) -> None:
        self.processes: dict[tuple[int, float], psutil.Process] = {}

    def add(self, pid: int) -> psutil.Process | None:
        import psutil

        try:
            proc = psutil.Process(pid)
            key = (proc.pid, proc.create_time())
        except psutil.Error:
            return None  # already gone and reaped: nothing to check
        return self.processes.setdefault(key, proc)

    def watch(self, context: WorkerContext) -> None:
        from .._introspect import watch_workers

        def add_worker(pid: int) -> None:
            self.add(pid)

        watch_workers(context, add_worker)

    def snapshot(self, context: WorkerContext) -> None:
        """Add the context's processes now, and every process below them: one a
        job or the template started, still running when the context closes,
        is a leftover of the test too."""
        import psutil

        from .._introspect import context_processes

        for record in context_processes(context):
            proc = self.add(record.pid)
            if proc is None:
                continue
            try:
                descendants = proc.children(recursive=True)
            except psutil.Error:
                descendants = []
            for child in descendants:
                self.add(child.pid)

    def survivors(self, timeout: float) -> list[psutil.Process]:
        deadline = time.monotonic() + timeout
        while True:
            alive = [proc for proc in self.processes.values() if _outlives(proc)]
            if not alive or time.monotonic() >= deadline:
                return alive
            time.sleep(0.02)


def _outlives(proc: psutil.Process) -> bool:
    """Still running, or dead but left unreaped by this process.

    A zombie whose parent is someone else (a worker orphaned to init, say) is
    not this process's to reap, and not a leak of the context.
    """
    import psutil

    try:
        if not proc.is_running():
            return False
        if proc.status() == psutil.STATUS_ZOMBIE:
            return proc.ppid() == psutil.Process().pid
        return True
    except psutil.NoSuchProcess:
        return False


def _describe(proc: psutil.Process) -> str:
    import psutil

    try:
        info = proc.as_dict(["pid", "ppid", "status", "cmdline"])
    except psutil.Error:
        return f"pid {proc.pid}"
    cmdline = " ".join(info.get("cmdline") or [])
    if len(cmdline) > 120:
        # Keep the end: a worker's or template's role is its last arguments.
        cmdline = cmdline[:50] + " ... " + cmdline[-65:]
    return f"pid {info['pid']} (parent {info['ppid']}, {info['status']}): {cmdline}"


def _kill_and_reap(procs: list[psutil.Process], timeout: float) -> None:
    import psutil

    for proc in procs:
        try:
            proc.kill()  # psutil checks the creation time first: never a reused pid
        except psutil.Error:
            pass
    for proc in procs:
        try:
            proc.wait(timeout)  # reaps it if it is this process's child
        except (psutil.Error, psutil.TimeoutExpired, ChildProcessError):
            pass


@pytest.fixture
def worker_context_leak_timeout() -> float:
    """Seconds the ``worker_context`` fixture waits, after the context closed,
    for its processes to be gone before it calls them leftovers (default 5)."""
    return DEFAULT_LEAK_TIMEOUT


@pytest.fixture
def worker_context(request: pytest.FixtureRequest, worker_context_leak_timeout: float) -> Iterator[WorkerContext]:
    """An open trio_parallel_fs WorkerContext, for the whole test; errors the
    test at teardown if any of its processes (its template, its workers, or a
    process they started) outlives it, and kills those.

    Configure it with WorkerConfig's keywords: ``@pytest.mark.worker_context(...)``
    or ``@pytest.mark.parametrize("worker_context", [{...}], indirect=True)``.
    See "Testing and profiling with pytest" in the trio_parallel_fs documentation.
    """
    import trio

    from .._config import WorkerConfig
    from .._frontend import WorkerContext

    config = WorkerConfig(**_requested_config(request))
    context = WorkerContext(config, _private=True)
    tracker = _ProcessTracker()
    tracker.watch(context)
    try:
        trio.run(context._start)
        yield context
    finally:
        try:
            tracker.snapshot(context)
            # What the exit of open_worker_context does, minus waiting for jobs
            # still running: no Trio run is left here to run them.
            context._close_blocking()
        finally:
            survivors = tracker.survivors(worker_context_leak_timeout)
            if survivors:
                described = [_describe(proc) for proc in survivors]
                _kill_and_reap(survivors, worker_context_leak_timeout)
                pytest.fail(
                    f"{len(survivors)} process(es) of the worker context outlived it "
                    f"(still there {worker_context_leak_timeout}s after it closed; now "
                    "killed):\n  " + "\n  ".join(described) + "\n"
                    "Stop what a job or hook starts before the context closes; a template or "
                    "worker of the context itself left behind is a bug in trio_parallel_fs.",
                    pytrace=False,
                )


# --- trio_benchmark -----------------------------------------------------------------

# Stash keys on a test item: its awaited-time clock, and whether the plugin
# (not the test) put ``benchmark`` among its fixture names.
_CLOCK = pytest.StashKey["AwaitedTime"]()
_ADDED_BENCHMARK = pytest.StashKey[bool]()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Make each test that uses ``trio_benchmark`` a benchmark in
    pytest-benchmark's eyes before its own collection hook looks (see the
    module's docstring)."""
    if not config.pluginmanager.hasplugin("benchmark"):
        return
    for item in items:
        names = getattr(item, "fixturenames", None)
        if not isinstance(names, list) or "trio_benchmark" not in names:
            continue
        if "benchmark" not in names:
            # A new list for this item: parametrized items share the old one.
            item.fixturenames = [*names, "benchmark"]  # type: ignore[attr-defined]
            item.stash[_ADDED_BENCHMARK] = True
        _hand_clock(item)


def _hand_clock(node: pytest.Item) -> AwaitedTime:
    """The test's awaited-time clock, given to pytest-benchmark's fixture
    through the closest ``benchmark`` marker (made once per test).

    pytest-benchmark's fixture takes its timer from that marker: the clock goes
    there, keeping the test's own options (max_time, min_rounds, group...); a
    ``timer`` given there is replaced.
    """
    clock = node.stash.get(_CLOCK, None)
    if clock is None:
        clock = node.stash[_CLOCK] = AwaitedTime()
        closest = node.get_closest_marker("benchmark")
        options = dict(closest.kwargs) if closest is not None else {}
        node.add_marker(pytest.mark.benchmark(**{**options, "timer": clock}), append=False)
    return clock


class AwaitedTime:
    """A clock for pytest-benchmark that advances only while a timed call is
    awaited (measured in Trio, with ``trio.current_time()``).

    pytest-benchmark measures a clock's resolution before calibrating, by
    reading it until it ticks; a clock that stands still between calls would
    never tick there. So each read also advances it by one nanosecond, as
    reading a real clock takes time: a timed round then lasts its awaited time
    plus 1 ns, far below the resolution of anything awaited.
    """

    # pytest-benchmark names its timer in reports and in --benchmark-json.
    __name__ = "awaited_time"
    READ_TICK = 1e-9

    def __init__(self) -> None:
        self.elapsed = 0.0
        self._reads = 0

    def __call__(self) -> float:
        self._reads += 1
        return self.elapsed + self._reads * self.READ_TICK


class TrioBenchmark:
    """Times awaited calls with pytest-benchmark, in the test's own Trio run."""

    def __init__(self, benchmark: Any, clock: AwaitedTime) -> None:
        self.benchmark = benchmark
        self.clock = clock

    async def _timed(
        self, async_fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        import trio

        start = trio.current_time()
        try:
            awaitable = async_fn(*args, **kwargs)
            if not inspect.isawaitable(awaitable):
                raise TypeError(
                    f"trio_benchmark times async calls; {async_fn!r} returned "
                    f"{type(awaitable).__name__}, not an awaitable. Use the benchmark "
                    "fixture for sync functions."
                )
            return await awaitable
        finally:
            self.clock.elapsed += trio.current_time() - start

    def _timed_from_thread(self, async_fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        import trio

        def call(*args: Any, **kwargs: Any) -> Any:
            return trio.from_thread.run(self._timed, async_fn, args, kwargs)

        return call

    @staticmethod
    def _untimed_from_thread(fn: Callable[..., Any] | None) -> Callable[..., Any] | None:
        if fn is None:
            return None
        import trio

        async def call_maybe_async(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return result

        def call(*args: Any, **kwargs: Any) -> Any:
            return trio.from_thread.run(call_maybe_async, args, kwargs)

        return call

    async def _in_thread(self, run: Callable[[], Any]) -> Any:
        import trio

        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            raise RuntimeError(
                "await trio_benchmark(...) from inside Trio (an async test under "
                "pytest-trio, for example)"
            ) from None
        return await trio.to_thread.run_sync(run)

    async def __call__(self, async_fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        """Like ``benchmark(fn, *args, **kwargs)``, for ``await async_fn(*args, **kwargs)``."""
        timed = self._timed_from_thread(async_fn)
        return await self._in_thread(lambda: self.benchmark(timed, *args, **kwargs))

    async def pedantic(
        self,
        async_fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        setup: Callable[..., Any] | None = None,
        teardown: Callable[..., Any] | None = None,
        rounds: int = 1,
        warmup_rounds: int = 0,
        iterations: int = 1,
    ) -> Any:
        """Like ``benchmark.pedantic``; ``setup``/``teardown`` may be async, and are not timed."""
        timed = self._timed_from_thread(async_fn)
        return await self._in_thread(
            lambda: self.benchmark.pedantic(
                timed,
                args=args,
                kwargs=kwargs,
                setup=self._untimed_from_thread(setup),
                teardown=self._untimed_from_thread(teardown),
                rounds=rounds,
                warmup_rounds=warmup_rounds,
                iterations=iterations,
            )
        )

    @property
    def extra_info(self) -> dict[str, Any]:
        return self.benchmark.extra_info  # type: ignore[no-any-return]

    @property
    def stats(self) -> Any:
        return self.benchmark.stats


@pytest.fixture
def trio_benchmark(request: pytest.FixtureRequest) -> TrioBenchmark:
    """pytest-benchmark for awaited calls, in the test's Trio run: ``await
    trio_benchmark(async_fn, *args)``, ``await trio_benchmark.pedantic(...)``.
    Times only the awaited call, not the hand-offs between threads. Needs
    pytest-benchmark. See "Testing and profiling with pytest" in the
    trio_parallel_fs documentation.
    """
    # Checked before asking for the fixture, so that the user sees one line
    # (pytest.fail inside an except block would show the lookup error too).
    if not request.config.pluginmanager.hasplugin("benchmark"):
        pytest.fail(
            "trio_benchmark needs pytest-benchmark, which is not installed or not "
            "loaded (-p no:benchmark): pip install pytest-benchmark",
            pytrace=False,
        )
    if "benchmark" in request.fixturenames and not request.node.stash.get(_ADDED_BENCHMARK, False):
        pytest.fail(
            f"{request.node.name} uses both benchmark and trio_benchmark; pytest-benchmark "
            "allows one benchmark per test: use trio_benchmark for awaited calls, or "
            "benchmark for sync ones",
            pytrace=False,
        )
    # Made at collection already, unless the test asked for this fixture
    # only while it ran (request.getfixturevalue).
    clock = _hand_clock(request.node)
    return TrioBenchmark(request.getfixturevalue("benchmark"), clock)
