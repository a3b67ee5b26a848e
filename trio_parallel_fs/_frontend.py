"""run_sync, worker contexts, the default context and the default limiter.

A call's checks, limiter and cancellation rules are the front end's that
every worker type shares (``_calls``); a `WorkerContext` is the local worker
types' `_calls.Runner`.
"""

from __future__ import annotations

import atexit
import contextvars
import functools
import math
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from _trio_parallel_fs_worker import protocol as p
from _trio_parallel_fs_worker._spin import usable_cpus
from _trio_parallel_fs_worker.codec import dumps_job

from . import _loops
from ._backends.seam import Backend
from ._calls import call, find_unpicklable, wait_for_running_calls
from ._config import WorkerConfig, WorkerType, make_config
from ._describe import describe
from ._errors import context_closed, unpicklable_job_error
from ._map import ContextMaps, MapResults, open_map_results, run_map
from ._pool.pool import RESUBMIT, PoolClosed, WorkerContextStatistics, WorkerPool

if TYPE_CHECKING:
    import anyio
    import trio

T = TypeVar("T")


def _usable_cpus() -> int:
    # The affinity mask (else os.cpu_count()), bounded by a cgroup v2 CPU
    # quota (a container started with --cpus=2 on a 64-CPU host: 2), rounded up.
    return max(1, math.ceil(usable_cpus()))


def current_default_worker_limiter() -> trio.CapacityLimiter | anyio.CapacityLimiter:
    """The limiter that `run_sync` uses when given no ``limiter``.

    Under Trio a `trio.CapacityLimiter`, one per ``trio.run``; under asyncio an
    `anyio.CapacityLimiter`, one per event loop. Created with as many tokens as
    the CPUs this process may use: its affinity mask where the OS tells, else
    ``os.cpu_count()``; on Linux at most its cgroup's CPU quota (rounded up)
    where one is set. Change its ``total_tokens`` to run more or fewer workers
    at once.

    Raises:
        RuntimeError: outside ``trio.run`` and a running asyncio event loop.
    """
    return _loops.current().default_limiter(_usable_cpus)  # type: ignore[no-any-return]


current_default_process_limiter = current_default_worker_limiter


def _encode_job(fn: Callable[..., Any], args: tuple[Any, ...]) -> p.Job:
    """The job event the pool hands a worker's channel, which frames it as it
    sends it (over the socket, or with its buffers in the shared memory area)."""
    try:
        pickled, buffers = dumps_job(fn, args)
    except Exception as exc:
        raise unpicklable_job_error(describe(fn), find_unpicklable(fn, args)[0], exc) from exc
    return p.Job(pickled, buffers)


def make_backend(config: WorkerConfig) -> Backend:
    """The backend a context of this configuration is handed."""
    if config.worker_type is WorkerType.SPAWN:
        from ._backends.spawn.backend import SpawnBackend

        return SpawnBackend(config.blas_threads, config.memory_ceiling, config.memory_metric)
    from ._backends.template import TemplateBackend

    return TemplateBackend(config.template_settings(), config.blas_threads)


class WorkerContext(ContextMaps):
    """Workers with one configuration, and the jobs they run.

    Made by `open_worker_context` (or `cache_scope`, or behind `run_sync` for the
    default context), not directly. Its configuration is readable as attributes
    (``ctx.idle_timeout`` and so on; see `WorkerConfig`) and as ``ctx.config``.
    """

    _kind = "worker context"  # in messages (see _calls.Runner)

    def __init__(self, config: WorkerConfig, *, _private: bool = False, _backend: Backend | None = None) -> None:
        if not _private:
            raise TypeError("use open_worker_context() to make a WorkerContext")
        self.config = config
        self._pool = WorkerPool(config, _backend if _backend is not None else make_backend(config))

    def __getattr__(self, name: str) -> Any:
        # Read-only access to the configuration, as trio-parallel offers it.
        if name in _config_names():
            return getattr(self.config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"<WorkerContext {self.config!r}>"

    @_loops.ki_protected
    async def run_sync(
        self,
        sync_fn: Callable[..., T],
        *args: Any,
        kill_on_cancel: bool = False,
        cancellable: bool = False,
        limiter: Any = None,
        **keywords: Any,
    ) -> T:
        """Run ``sync_fn(*args)`` in one of this context's workers; see `run_sync`.

        Raises:
            trio.ClosedResourceError: if the context is closed (under asyncio
                `anyio.ClosedResourceError`).
        """
        if self._pool.closed:  # _check_usable, inline: a call less on the warm path
            raise _loops.closed_resource_error(context_closed(self._kind))
        return await call(lambda: self, sync_fn, args, keywords, kill_on_cancel or cancellable, limiter)

    def _check_usable(self) -> None:
        if self._pool.closed:
            raise _loops.closed_resource_error(context_closed(self._kind))

    # --- the Runner of _calls ---------------------------------------------

    def _default_limiter(self) -> Any:
        return current_default_worker_limiter()

    def _prepare(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> p.Job:
        return _encode_job(fn, args)

    _closed_error: type[Exception] = PoolClosed
    _resubmit = RESUBMIT

    def _run_job(self, fn: Callable[..., Any], job: p.Job, kill_on_cancel: bool) -> Awaitable[Any]:
        # The pool's own coroutine (see _calls.Runner). kill_on_cancel needs
        # nothing here: unshielded, the pool kills the worker of a cancelled call.
        return self._pool.run(job, fn)

    def statistics(self) -> WorkerContextStatistics:
        """A `WorkerContextStatistics` snapshot; eventually consistent when
        several threads run jobs in this context at once."""
        return self._pool.statistics()

    async def _start(self) -> None:
        await self._pool.start()

    async def _aclose(self) -> None:
        await wait_for_running_calls(lambda: self._pool.running)
        with _loops.CancelScope(shield=True):
            await _loops.to_thread_run_sync(functools.partial(self._pool.close_blocking, self.config.grace_period))

    def _close_blocking(self) -> None:
        self._pool.close_blocking(self.config.grace_period)


@functools.cache
def _config_names() -> frozenset[str]:
    return frozenset(field.name for field in attrs.fields(WorkerConfig))


# --- the default context ------------------------------------------------------

_default_lock = threading.Lock()
_default_config = WorkerConfig()
_default_context: WorkerContext | None = None
_default_pid = os.getpid()  # the process that owns _default_context
_scoped_context: contextvars.ContextVar[WorkerContext | None] = contextvars.ContextVar(
    "trio_parallel_fs.cache_scope", default=None
)


def _forget_default_after_fork() -> None:
    """In a child forked from the process that made the default context: drop
    it without closing it (its template and workers are the parent's)."""
    global _default_context, _default_lock, _default_pid
    _default_lock = threading.Lock()  # another thread may have held it at the fork
    if _default_context is not None:
        _default_context._pool.close_blocking(0)  # forgets, touching nothing
    _default_context = None
    _default_pid = os.getpid()


def _get_default_context() -> WorkerContext:
    scoped = _scoped_context.get()
    if scoped is not None:
        return scoped
    global _default_context
    if _default_pid != os.getpid():
        _forget_default_after_fork()
    context = _default_context
    if context is None:
        with _default_lock:
            if _default_context is None:
                _default_context = WorkerContext(_default_config, _private=True)
            context = _default_context
    return context


def configure_default_context(*args: Any, **config: Any) -> None:
    """Set the configuration of the default context that `run_sync` uses.

    Takes the keywords of `WorkerConfig` (the first five may be positional, as
    in trio-parallel). Workers of the previous default context are shut down
    (gracefully, within its grace period); calls waiting for a limiter token
    run on the new one.

    Raises:
        TypeError: for an argument of the wrong type or an unknown keyword, naming it.
        ValueError: for an argument out of range, naming it.
        RuntimeError: if jobs are running in the default context.
    """
    new_config = make_config("configure_default_context", args, config)
    global _default_config, _default_context
    if _default_pid != os.getpid():
        _forget_default_after_fork()
    with _default_lock:
        old = _default_context
        if old is not None and old._pool.running:
            raise RuntimeError(
                "cannot reconfigure the default context while jobs run in it; "
                "configure it before the first run_sync, or use open_worker_context"
            )
        _default_config = new_config
        _default_context = None
    if old is not None:
        old._close_blocking()


def default_context_statistics() -> WorkerContextStatistics:
    """Statistics of the context `run_sync` would use here (see `WorkerContext.statistics`)."""
    return _get_default_context().statistics()


@atexit.register
def _shut_down_default_context() -> None:
    global _default_context
    if _default_pid != os.getpid():
        # A forked child exiting: the default context is its parent's.
        _forget_default_after_fork()
        return
    with _default_lock:
        context, _default_context = _default_context, None
    if context is not None:
        context._close_blocking()


@asynccontextmanager
async def open_worker_context(*args: Any, **config: Any) -> AsyncIterator[WorkerContext]:
    """Open a `WorkerContext` with its own workers, configured by the keywords of
    `WorkerConfig` (the first five may be positional, as in trio-parallel).

    The template starts on entry (with ``SPAWN`` and a ``preload`` or
    ``template_init``, the first worker does, and then takes the first job),
    so a failing preload raises here, as `TemplateStartError`. On exit the
    context waits for jobs still running in it, then closes its workers within
    ``grace_period``; this wait is not cancellable, so hand the context only to
    tasks inside the block.

    Raises:
        TypeError: for an argument of the wrong type or an unknown keyword, naming it.
        ValueError: for an argument out of range, naming it.
        TemplateStartError: if the template (or the first spawned worker) could not preload.
        BrokenWorkerError: if a worker had to be killed at exit.
    """
    context = WorkerContext(make_config("open_worker_context", args, config), _private=True)
    try:
        await context._start()
        yield context
    finally:
        await context._aclose()


@asynccontextmanager
async def cache_scope(*args: Any, **config: Any) -> AsyncIterator[None]:
    """Make `run_sync` use a fresh context, configured like `open_worker_context`,
    in this task and the tasks it starts inside the block.

    Contexts from `open_worker_context` are not affected. Nested scopes win.
    """
    context = WorkerContext(make_config("cache_scope", args, config), _private=True)
    try:
        await context._start()
        token = _scoped_context.set(context)
        try:
            yield
        finally:
            _scoped_context.reset(token)
    finally:
        await context._aclose()


@_loops.ki_protected
async def run_sync(
    sync_fn: Callable[..., T],
    *args: Any,
    kill_on_cancel: bool = False,
    cancellable: bool = False,
    limiter: Any = None,
    **keywords: Any,
) -> T:
    """Run ``sync_fn(*args)`` in a worker process and return or raise its outcome.

    For CPU-bound work that would block Trio (and the GIL), blocking calls you
    want to be able to kill, and code that may crash. Functions and arguments
    travel by cloudpickle, so functions defined in ``__main__``, lambdas and
    closures work. Workers are cached and reused; their global state persists
    between jobs on the same worker, but which worker runs a job is not
    specified.

    Args:
        sync_fn: A synchronous callable. Async and generator functions are refused.
        *args: Its positional arguments.
        **keywords: Refused with a TypeError that shows the fix: bind keyword
            arguments with `functools.partial` first.
        kill_on_cancel: Let cancellation kill the worker; see below.
        cancellable: trio-parallel's older name for ``kill_on_cancel``; either
            being true enables it.
        limiter: The `trio.CapacityLimiter` (or any async context manager) that
            bounds how many workers run at once. Default:
            `current_default_worker_limiter`.

    Returns:
        Whatever ``sync_fn(*args)`` returns.

    Raises:
        BaseException: Whatever ``sync_fn(*args)`` raises, with its chain, and
            the worker's traceback as a `RemoteTraceback` at the chain's end.
        BrokenWorkerError: the worker died (its subclasses say why: the memory
            ceiling, a failing init or retire hook).
        TemplateStartError: the template could not start.
        pickle.PicklingError: the function or an argument cannot be pickled.
        TypeError: ``sync_fn`` is async, a generator function, or not callable.

    Cancellation handling:
        Entering ``run_sync`` is a checkpoint, like ``trio.to_thread.run_sync``:
        a call made in an already-cancelled scope raises `trio.Cancelled`
        without starting anything. Waiting for the limiter is cancellable.
        Once a limiter token is held, by default the rest is shielded
        (starting a worker, sending the job, waiting): the call returns the
        result, and cancellation takes effect at your next checkpoint. With ``kill_on_cancel=True`` the worker is killed
        (SIGKILL), its exit is awaited, and `trio.Cancelled` propagates; the
        job's side effects may be partly done. No worker is leaked either way.
    """
    return await call(_get_default_context, sync_fn, args, keywords, kill_on_cancel or cancellable, limiter)


async def map(  # noqa: A001 - the name of the builtin it stands for
    sync_fn: Callable[..., T],
    *iterables: Iterable[Any],
    chunksize: int | None = None,
    kill_on_cancel: bool = False,
    limiter: Any = None,
) -> list[T]:
    """``sync_fn`` over every item in worker processes, as the builtin ``map``
    does it: ``[sync_fn(x) for x in items]``, or ``sync_fn(a, b)`` for the
    items ``a, b`` of several iterables zipped.

    Items go to the workers in *chunks*, one job each, so that a tiny item does
    not pay a round trip of its own. The input is read lazily, a bounded window
    of chunks at a time. See :doc:`map`.

    Args:
        sync_fn: A synchronous callable, as for `run_sync`.
        *iterables: One or more iterables; the shortest ends the map.
        chunksize: Items per job. None (the default) sizes chunks from the
            time the items take in the workers: as many as take some 10 ms,
            smaller at the start and, when the input's length is known, at
            the end, so that every worker ends close to the others.
        kill_on_cancel: As for `run_sync`, for every chunk running when the
            map is cancelled.
        limiter: As for `run_sync`: at most its tokens' worth of chunks run at
            once. Default: `current_default_worker_limiter`.

    Returns:
        The results, in input order.

    Raises:
        BaseException: The exception of the first failing item in input order,
            with a note that names the item (``add_note``; on Python 3.10 in
            ``__notes__``). Chunks of later items are cancelled.
        BrokenWorkerError: a worker died; its note names the items of its chunk.
        pickle.PicklingError: the function or an item cannot be pickled (the
            message names which).
        TypeError: ``sync_fn`` is async, a generator function, or not callable;
            an argument after it is not iterable; ``chunksize`` is not an int.
        ValueError: ``chunksize`` is below 1.

    Cancellation handling:
        As `run_sync`'s, chunk by chunk: entering is a checkpoint; chunks
        waiting for the limiter are cancelled; running chunks finish,
        shielded, unless ``kill_on_cancel``, which kills their workers. The
        call returns only once no chunk of it runs or waits.
    """
    return await run_map(_get_default_context, sync_fn, iterables, chunksize, kill_on_cancel, limiter)


def imap(
    sync_fn: Callable[..., Any],
    *iterables: Iterable[Any],
    ordered: bool = True,
    chunksize: int | None = None,
    kill_on_cancel: bool = False,
    limiter: Any = None,
) -> MapResults:
    """`map`, streamed: results as they come, in an ``async with`` block.

    .. code-block:: python

        async with trio_parallel_fs.imap(fn, items) as results:
            async for result in results:
                ...

    At most a bounded window of chunks is read ahead of the loop, so the
    input and the results waiting for the loop stay bounded, whatever the
    input's length. Leaving the block (at the end, with ``break``, or by an
    exception) stops the map: chunks not started are dropped, running ones
    finish (or are killed, with ``kill_on_cancel``), and the block's exit
    waits for them.

    Args:
        ordered: True (the default): results in input order. False: in the
            order their chunks finish (a slow item then holds back only the
            results of its own chunk).
        sync_fn, iterables, chunksize, kill_on_cancel, limiter: as for `map`.

    Returns:
        An async context manager whose value is an async iterator of the results.

    Raises:
        BaseException: as for `map`, from the loop, after the results of the
            items before the failing item's chunk.
    """
    return open_map_results(_get_default_context, sync_fn, iterables, ordered, chunksize, kill_on_cancel, limiter)

