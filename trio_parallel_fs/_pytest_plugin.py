"""pytest plugin: a leak-checked ``worker_context`` fixture and ``trio_benchmark``.

It loads through the package's ``pytest11`` entry point whenever
trio_parallel_fs is installed; ``-p trio_parallel_fs._pytest_plugin`` loads it
explicitly.

``worker_context``
------------------
A `trio_parallel_fs.WorkerContext`, open for the whole test, that **fails the
test if any of its processes outlives it**: after the context has closed, its
template and every worker it ever started must be gone (exited and reaped)
within ``worker_context_leak_timeout`` seconds (a fixture, 5 by default;
override it in a conftest). Leftovers are killed, so one leak does not cascade
into the following tests, and the failure (reported by pytest as an error at
teardown) lists them. A context that cannot close cleanly (its
``BrokenWorkerError``) errors the test the same way.

Configure it with the keywords of `trio_parallel_fs.WorkerConfig`, through a
marker, indirect parametrization, or both (the parameter wins)::

    @pytest.mark.worker_context(preload=["numpy"], max_jobs=1)
    async def test_fresh_workers(worker_context):
        await worker_context.run_sync(job)

    @pytest.mark.parametrize(
        "worker_context", [{"worker_type": "spawn"}, {}], indirect=True
    )
    async def test_both_backends(worker_context): ...

The fixture is synchronous on purpose: a worker context is not tied to a
``trio.run`` (its pool holds no Trio objects), so the same fixture serves
pytest-trio tests, anyio's trio backend, and plain tests that call
``trio.run`` themselves, as many times as they like. The template starts in
the fixture's setup, so a failing ``preload`` errors the test there.

``trio_benchmark``
------------------
pytest-benchmark times plain functions; this fixture lets it time awaited
calls inside Trio (needs pytest-benchmark; the test must run in Trio, e.g.
under pytest-trio)::

    async def test_warm_call(trio_benchmark, worker_context):
        await worker_context.run_sync(job)  # warm up outside the timing
        await trio_benchmark(worker_context.run_sync, job)

``await trio_benchmark(async_fn, *args, **kwargs)`` mirrors
``benchmark(fn, *args, **kwargs)`` and returns the result of one call;
``await trio_benchmark.pedantic(async_fn, args=..., setup=..., rounds=...)``
mirrors ``benchmark.pedantic`` (``setup`` and ``teardown`` may be sync or
async and run in Trio, untimed). ``trio_benchmark.benchmark`` is the underlying
fixture, for ``extra_info``, ``group`` and ``stats``.

How it measures, and why:

* pytest-benchmark's loop blocks its thread, so it cannot run in the Trio
  thread. It runs in a worker thread (``trio.to_thread``); each iteration hands
  the call back to the test's Trio loop with ``trio.from_thread.run``, so the
  awaited call runs in the test's own run, next to the contexts and state the
  test set up.
* The hand-off between threads costs about as much as a warm ``run_sync``, so
  it must not be timed. pytest-benchmark is given a *clock of awaited time*
  instead of ``perf_counter``: it advances only while a timed call is being
  awaited, measured inside Trio with ``trio.current_time()`` (``perf_counter``
  plus an offset with the default clock). Rounds, iterations, calibration and
  statistics work unchanged and see only the awaited time; setup, teardown and
  the hand-offs are not counted. The price is wall time: a benchmark takes
  longer than its reported ``max_time`` (for a ~100 µs call, about twice).
* Because the clock is Trio's, a test with pytest-trio's ``autojump_clock``
  records virtual time exactly (this is how the plugin's own tests check it).
* The resumption after the awaited call is scheduled like any task's, so the
  figure is what a caller sees. Other tasks running in the test's loop at the
  same time are measured too: keep the loop quiet while benchmarking.
* ``--benchmark-timer`` is ignored (the clock is Trio's), and
  ``--benchmark-cprofile`` profiles the hand-off thread, not the awaited call.
  The clock is installed through pytest-benchmark internals (``_timer``,
  ``_precisions``), checked by this plugin's tests.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psutil
import pytest
import trio

from ._config import WorkerConfig
from ._frontend import WorkerContext
from ._spawn import SpawnedWorker

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
    """Remembers every process a context starts, as psutil handles.

    A psutil.Process remembers its pid's creation time, so a handle never
    mistakes (or kills) an unrelated process that reused the pid. Handles are
    taken while the process cannot have been reaped yet: spawned workers at
    start (only the pool reaps them), the template and its children before the
    context closes (only the template reaps its workers, and only the parent
    reaps the template).
    """

    def __init__(self) -> None:
        self.processes: dict[tuple[int, float], psutil.Process] = {}

    def add(self, pid: int | None) -> psutil.Process | None:
        if pid is None:
            return None
        try:
            proc = psutil.Process(pid)
            key = (proc.pid, proc.create_time())
        except psutil.Error:
            return None  # already gone and reaped: nothing to check
        return self.processes.setdefault(key, proc)

    def watch(self, context: WorkerContext) -> None:
        # Wrap the backend's start_worker on this context only, to learn each
        # spawned worker's pid the moment it exists. Forked workers are found
        # as the template's children instead (their pid arrives later).
        backend = context._pool._backend
        start_worker = backend.start_worker

        @functools.wraps(start_worker)
        def tracked_start_worker() -> Any:
            channel, process = start_worker()
            if isinstance(process, SpawnedWorker):  # its pid is known now
                self.add(process.pid)
            return channel, process

        backend.start_worker = tracked_start_worker  # type: ignore[method-assign]

    def snapshot(self, context: WorkerContext) -> None:
        template = self.add(context.statistics().template_pid)
        if template is not None:
            try:
                children = template.children(recursive=True)
            except psutil.Error:
                children = []
            for child in children:
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
    try:
        if not proc.is_running():
            return False
        if proc.status() == psutil.STATUS_ZOMBIE:
            return proc.ppid() == psutil.Process().pid
        return True
    except psutil.NoSuchProcess:
        return False


def _describe(proc: psutil.Process) -> str:
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
    """Seconds the ``worker_context`` fixture waits for its processes to go."""
    return DEFAULT_LEAK_TIMEOUT


@pytest.fixture
def worker_context(request: pytest.FixtureRequest, worker_context_leak_timeout: float) -> Any:
    """An open WorkerContext; fails the test if any of its processes outlives it.
    See the module docstring for configuration."""
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
                    "killed):\n  " + "\n  ".join(described),
                    pytrace=False,
                )


# --- trio_benchmark -----------------------------------------------------------------


class AwaitedTime:
    """A clock for pytest-benchmark that advances only while a timed call is awaited."""

    # pytest-benchmark names its timer in reports and in --benchmark-json.
    __name__ = "awaited_time"

    def __init__(self) -> None:
        self.elapsed = 0.0

    def __call__(self) -> float:
        return self.elapsed


class TrioBenchmark:
    """Times awaited calls with pytest-benchmark; see the module docstring."""

    def __init__(self, benchmark: Any) -> None:
        self.benchmark = benchmark
        self.clock = AwaitedTime()
        self._installed = False

    def _install_clock(self) -> None:
        if self._installed:
            return
        fixture = self.benchmark
        # pytest-benchmark calibrates against its timer's resolution, which it
        # measures by calling the timer until it ticks: the awaited-time clock
        # would never tick there. Lend it the real timer's resolution (same
        # underlying clock), in this fixture's own table of precisions.
        precision = fixture._get_precision(fixture._timer)
        fixture._precisions = {**fixture._precisions, self.clock: precision}
        fixture._timer = self.clock
        self._installed = True

    async def _timed(
        self, async_fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
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
        def call(*args: Any, **kwargs: Any) -> Any:
            return trio.from_thread.run(self._timed, async_fn, args, kwargs)

        return call

    @staticmethod
    def _untimed_from_thread(fn: Callable[..., Any] | None) -> Callable[..., Any] | None:
        if fn is None:
            return None

        async def call_maybe_async(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return result

        def call(*args: Any, **kwargs: Any) -> Any:
            return trio.from_thread.run(call_maybe_async, args, kwargs)

        return call

    async def _in_thread(self, run: Callable[[], Any]) -> Any:
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            raise RuntimeError(
                "await trio_benchmark(...) from inside Trio (an async test under "
                "pytest-trio, for example)"
            ) from None
        self._install_clock()
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
    """pytest-benchmark for awaited calls in Trio; see the module docstring."""
    try:
        benchmark = request.getfixturevalue("benchmark")
    except pytest.FixtureLookupError:
        pytest.fail(
            "trio_benchmark needs pytest-benchmark: pip install 'trio_parallel_fs[bench]'",
            pytrace=False,
        )
    return TrioBenchmark(benchmark)
