"""Run synchronous functions from Trio on a Dask cluster: ``run_sync``, scaled out.

Needs the ``dask`` extra (``pip install '.[dask]'`` from a checkout,
``pip install 'trio_parallel_fs[dask]'`` from a package index). Importing
``trio_parallel_fs`` alone never imports Dask; importing this module does.

.. code-block:: python

    from trio_parallel_fs.dask import open_dask_context

    async with open_dask_context("tcp://scheduler:8786", preload=["numpy"]) as ctx:
        result = await ctx.run_sync(fn, *args)

Theory of operation: each call hands the client's event loop one coroutine
(``_backends.dask.job``) that submits ``fn(*args)``, waits for the task and
fetches the result, and the calling task waits for that coroutine
(``_backends.dask.bridge``). Under Trio the client is a synchronous
``distributed.Client``, whose asyncio loop runs in a thread of its own: the
coroutine's end wakes the Trio task through the run's
`trio.lowlevel.TrioToken`, and no asyncio runs in Trio's thread. Under asyncio
the context's client is an asynchronous one (``asynchronous=True``) on the
caller's own loop, where the coroutine is a task: no thread at all (a
synchronous client passed in still works, through its thread). No thread is
blocked per call either way. A `trio.CapacityLimiter` sized to the
cluster's threads keeps at most one job per Dask thread in flight; a
background task polls the scheduler and resizes it as workers come and go.
Dask cannot stop a thread that runs a job, so cancelling with
``kill_on_cancel`` has the worker's nanny kill that worker process, and the
nanny starts a fresh one (``_kill``).
"""

from __future__ import annotations

import contextlib
import functools
import types
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import cloudpickle
import outcome

try:
    from distributed import Client
except ImportError as exc:  # pragma: no cover - the dask extra is installed for the tests
    raise ImportError(
        "trio_parallel_fs.dask needs Dask's distributed package, which is not installed here. Install "
        "the dask extra: pip install '.[dask]' from a checkout of trio_parallel_fs, or pip install "
        "'trio_parallel_fs[dask]' where it comes from a package index."
    ) from exc

from _trio_parallel_fs_worker import _chunks

# BrokenWorkerError by its public name: the private modules behind it may move.
from . import BrokenWorkerError, _loops
from ._backends.dask import worker as _dask_worker
from ._backends.dask.bridge import SameLoopBridge, awaited, bridge_for, runs_here
from ._backends.dask.job import Job, cancel_job, run_job, unwrap
from ._backends.dask.logs import RESTARTING, STILL_ALIVE, DaskLogFilter, quieted
from ._calls import RESUBMIT, RunnerClosed, call, wait_for_running_calls
from ._config import preload_modules
from ._errors import context_closed
from ._map import ContextMaps

# The worker-side code travels by value: Dask workers need ``distributed``,
# not trio_parallel_fs (nor trio, which importing it would bring).
cloudpickle.register_pickle_by_value(_dask_worker)


def _by_value(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of ``fn`` that cloudpickle pickles by value: it is not the object
    its module holds under its name. Registering the module instead would
    change every pickle of it in this process: local contexts' map chunks
    would then carry the chunk runner by value too (some 20 µs a chunk)."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__qualname__, copy.__module__, copy.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    copy.__kwdefaults__, copy.__annotations__ = fn.__kwdefaults__, fn.__annotations__
    copy.__dict__.update(fn.__dict__)
    return copy


# Map's chunk runner (standard library only), as a Dask context's chunks carry it.
_RUN_CHUNK = _by_value(_chunks.run_chunk)

if TYPE_CHECKING:
    import anyio
    import trio

T = TypeVar("T")

__all__ = ["DaskContext", "DaskContextStatistics", "open_dask_context"]

#: How long ``kill_on_cancel`` may take to find and kill a job's worker.
KILL_TIMEOUT = 60.0
#: Seconds a nanny lets its worker try to close before killing it: a worker
#: whose thread runs a job can only finish closing once the job returns.
KILL_GRACE = 0.5
#: Default seconds to wait for a scheduler to answer (Dask's own default is 30).
CONNECT_TIMEOUT = 10.0
#: After a worker died under a job of the context (or was killed for
#: ``kill_on_cancel``), each call ends by looking at the cluster again, until
#: it has as many threads as before or this many seconds have passed.
SETTLE_TIMEOUT = 60.0
#: Longest wait for the scheduler's answer to one of those looks.
LOOK_TIMEOUT = 5.0


@attrs.frozen
class DaskContextStatistics:
    """A snapshot of a `DaskContext`.

    Attributes:
        scheduler_address: The scheduler the context's client talks to.
        workers: Dask workers in the cluster at the last look: every
            ``refresh_interval`` (see `open_dask_context`), and at the end of
            each call while a worker lost under one of the context's jobs (or
            killed for ``kill_on_cancel``) is being replaced.
        total_threads: Their threads, which is the default limiter's size.
        running_jobs: Jobs of this context submitted and not yet ended.
        submitted_jobs: Calls handed to the client so far (past the limiter).
        completed_jobs: Jobs that returned a value.
        failed_jobs: Jobs that raised an exception, or could not be pickled.
        broken_jobs: Jobs whose worker died under them (`BrokenWorkerError`).
        killed_jobs: Jobs cancelled with ``kill_on_cancel``.
        restarted_workers: Workers this context restarted to stop a killed job.
        preload: The modules every worker imports before its first job.
    """

    scheduler_address: str
    workers: int
    total_threads: int
    running_jobs: int
    submitted_jobs: int
    completed_jobs: int
    failed_jobs: int
    broken_jobs: int
    killed_jobs: int
    restarted_workers: int
    preload: tuple[str, ...]


async def _nthreads(client: Any) -> dict[str, int]:
    result: dict[str, int] = await client.nthreads(asynchronous=True)
    return result


async def _job_states(client: Any, key: str) -> dict[str, Any]:
    states: dict[str, Any] = await client.run(_dask_worker.job_state, key, on_error="return", asynchronous=True)
    return states


async def _nannies(client: Any, workers: list[str]) -> dict[str, str | None]:
    """The nanny address of each worker (None: it has none, or it has left)."""
    info = (await client.scheduler.identity(n_workers=-1))["workers"]
    return {addr: info.get(addr, {}).get("nanny") for addr in workers}


async def _kill_through_nannies(client: Any, workers: list[str]) -> dict[str, Any]:
    outcome: dict[str, Any] = await client.run(
        _dask_worker.kill_worker_process, KILL_GRACE, workers=workers, nanny=True, on_error="return", asynchronous=True
    )
    return outcome


class DaskContext(ContextMaps):
    """Runs jobs on one Dask cluster, through one client.

    Made by `open_dask_context`, not directly. It belongs to the Trio run (or
    asyncio event loop) that opened it (its limiter is a `trio.CapacityLimiter`,
    or an `anyio.CapacityLimiter` under asyncio).
    """

    def __init__(self, client: Client, preload: tuple[str, ...], *, _private: bool = False) -> None:
        if not _private:
            raise TypeError("use open_dask_context() to make a DaskContext")
        self.client = client
        self.preload = preload
        scheduler: Any = client.scheduler
        self.scheduler_address: str = scheduler.address
        # An asynchronous client's loop is this one; a synchronous one's runs
        # in a thread of its own.
        self._bridge = bridge_for(client)
        self._run = _loops.current().current_run()  # the trio.run or asyncio loop that opened it
        self._limiter: trio.CapacityLimiter | anyio.CapacityLimiter = _loops.current().CapacityLimiter(1)
        self._nthreads: dict[str, int] = {}
        # While a lost worker is being replaced: until when, and how many
        # threads the cluster had before (see _worker_lost).
        self._settle_until: float | None = None
        self._settle_threads = 0
        self._most_threads = 0
        self._plugin_name: str | None = None
        self._logs: DaskLogFilter | None = None  # while open (see _backends/dask/logs)
        self._closed = False
        self._running = 0
        self._counts = dict.fromkeys(["submitted", "completed", "failed", "broken", "killed", "restarted"], 0)

    def __repr__(self) -> str:
        return f"<DaskContext scheduler={self.scheduler_address!r} preload={self.preload!r}>"

    @property
    def limiter(self) -> trio.CapacityLimiter | anyio.CapacityLimiter:
        """The default limiter of `run_sync`, with as many tokens as the cluster
        has threads (at least one), kept up to date as workers join and leave."""
        return self._limiter

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
        """Run ``sync_fn(*args)`` on a Dask worker and return or raise its outcome.

        The contract and the arguments of `trio_parallel_fs.run_sync`, on the
        cluster: the function and arguments travel by Dask's pickling
        (cloudpickle for functions defined in ``__main__``), and each call is
        a new Dask task of its own key, run once even if its arguments repeat.
        The default ``limiter`` is the context's `limiter`.

        Returns:
            Whatever ``sync_fn(*args)`` returns.

        Raises:
            BaseException: Whatever ``sync_fn(*args)`` raises, with the worker's
                traceback as a `trio_parallel_fs.RemoteTraceback` as its cause.
            trio_parallel_fs.BrokenWorkerError: the worker died while running
                the job (Dask's ``KilledWorker``; the message names the worker's
                address), or the cluster dropped the job (the client lost its
                scheduler).
            pickle.PicklingError: the function or an argument cannot be pickled.
            TypeError: ``sync_fn`` is async, a generator function, or not
                callable; or keyword arguments were given for it.
            trio.ClosedResourceError: the context is closed.

        Cancellation handling:
            As for `trio_parallel_fs.run_sync`: entering is a checkpoint,
            waiting for the limiter is cancellable, and once the job is
            submitted the wait is shielded unless ``kill_on_cancel``. With
            ``kill_on_cancel=True`` the Dask future is cancelled; if a
            worker already runs the job, that worker process is restarted
            through its nanny (Dask cannot stop a running thread), which stops
            the job and frees its CPU, and any other job running on that
            worker is retried by Dask elsewhere. The call waits for that, then
            `trio.Cancelled` propagates. A worker without a nanny cannot be
            restarted: the job is abandoned there and a `RuntimeWarning` says so.
        """
        self._check_usable()
        return await call(lambda: self, sync_fn, args, keywords, kill_on_cancel or cancellable, limiter)

    def _check_usable(self) -> None:
        if self._closed:
            raise _loops.closed_resource_error(context_closed(self._kind))
        if _loops.current().current_run() is not self._run:
            raise RuntimeError(
                "this Dask context belongs to the trio.run (or asyncio event loop) that opened it; "
                "open another context (sharing the same Client) in this run"
            )

    # --- the Runner of _calls ---------------------------------------------

    _kind = "Dask context"  # in messages

    def _default_limiter(self) -> Any:
        return self._limiter

    def _prepare(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Job:
        # Dask pickles the job as it submits it, on the client's loop.
        return Job(_RUN_CHUNK if fn is _chunks.run_chunk else fn, args)

    _closed_error: type[Exception] = RunnerClosed
    _resubmit = RESUBMIT  # never returned: Dask runs a task again itself

    async def _run_job(self, fn: Callable[..., Any], job: Job, kill_on_cancel: bool) -> outcome.Value[Any]:
        if self._closed:
            raise RunnerClosed  # it closed while the call waited for its limiter
        self._counts["submitted"] += 1
        self._running += 1
        try:
            pending = self._bridge.start(run_job, self.client, job)
            loop = _loops.current()
            try:
                settled = await pending.wait()  # shielded unless kill_on_cancel
            except loop.Cancelled:
                with loop.CancelScope(shield=True):
                    await self._kill(job)
                    await self._look_while_settling()
                    # Counted inside: under asyncio, a cancellation that came
                    # again meanwhile (an anyio scope's does, every loop pass)
                    # is raised as the shield is left.
                    self._counts["killed"] += 1
                raise
        finally:
            self._running -= 1
        try:
            value = unwrap(settled, job.fn, job.args)
        except BrokenWorkerError:
            self._counts["broken"] += 1
            self._worker_lost()
            raise
        except BaseException:
            self._counts["failed"] += 1
            raise
        finally:
            await self._look_while_settling()
        self._counts["completed"] += 1
        return outcome.Value(value)

    async def _kill(self, job: Job) -> None:
        """Stop a job for ``kill_on_cancel``: cancel its future, and restart the
        worker whose thread runs it, if one does.

        The job's own coroutine on the client's loop is left to end by itself
        (it sees the future cancelled): cancelling Dask's gather halfway makes
        asyncio complain about a task exception nobody retrieved.
        """
        await self._bridge.run(cancel_job, self.client, job)
        if job.future is None:
            return  # it was never submitted (its arguments did not pickle)
        key = job.future.key
        # Once the scheduler has cancelled the key it sends it to no worker, but
        # the worker it was sent to may not have heard yet: there it may still
        # sit queued, and could start. Ask until no worker holds it queued.
        with _loops.move_on_after(KILL_TIMEOUT):
            while True:
                states = await self._bridge.run(_job_states, self.client, key)
                running = sorted(addr for addr, state in states.items() if state == _dask_worker.RUNNING)
                if running:
                    await self._restart(running, key)
                    return
                if _dask_worker.QUEUED not in states.values():
                    return
                await _loops.sleep(0.01)
        warnings.warn(
            f"kill_on_cancel gave up on job {key!r} after {KILL_TIMEOUT:.0f} s: it was still queued on a "
            "worker, or its worker did not die. It may still run; look at the cluster's dashboard.",
            RuntimeWarning,
            stacklevel=1,
        )

    async def _restart(self, workers: list[str], key: str) -> None:
        """Kill the worker processes running ``key`` through their nannies,
        which start fresh ones in their place."""
        nannies = await self._bridge.run(_nannies, self.client, workers)
        orphans = [addr for addr in workers if not nannies.get(addr)]
        if orphans:
            warnings.warn(
                f"kill_on_cancel could not stop job {key!r}: Dask worker(s) {orphans} have no nanny "
                "to restart them, so the job runs on there until it returns. Start workers with a "
                "nanny (the default of dask worker and LocalCluster) to let cancellation stop jobs.",
                RuntimeWarning,
                stacklevel=1,
            )
        workers = [addr for addr in workers if nannies.get(addr)]
        if workers:
            self._worker_lost()
            # The nannies say so on this process's stderr when they run here
            # (a LocalCluster): announce what they will say, to drop it.
            logs = self._logs
            alive = logs.expect(STILL_ALIVE, len(workers)) if logs else []
            restarting = logs.expect(RESTARTING, len(workers)) if logs else []
            try:
                outcome = await self._bridge.run(_kill_through_nannies, self.client, workers)
            finally:
                if logs:
                    # A nanny says "still alive" before its kill returns, or
                    # never (its worker closed in time).
                    logs.withdraw(alive)
            killed = sum(status == _dask_worker.KILLED for status in outcome.values())
            if logs:
                logs.withdraw(restarting[killed:])
            self._counts["restarted"] += killed

    def statistics(self) -> DaskContextStatistics:
        """A `DaskContextStatistics` snapshot."""
        return DaskContextStatistics(
            scheduler_address=self.scheduler_address,
            workers=len(self._nthreads),
            total_threads=sum(self._nthreads.values()),
            running_jobs=self._running,
            submitted_jobs=self._counts["submitted"],
            completed_jobs=self._counts["completed"],
            failed_jobs=self._counts["failed"],
            broken_jobs=self._counts["broken"],
            killed_jobs=self._counts["killed"],
            restarted_workers=self._counts["restarted"],
            preload=self.preload,
        )

    def _worker_lost(self) -> None:
        """A worker died under a job of ours, or we kill one: its nanny starts
        a new one, which the periodic look may miss for ``refresh_interval``
        (or catch halfway: no worker at all in a one-worker cluster). Until the
        cluster is back to its threads, each call ends with a look of its own,
        so that `statistics` and the limiter show the cluster as it is."""
        # The mark is the most threads any look saw: the last look may have
        # been a halfway one. A cluster that shrank for good (adaptive
        # scaling) ends the looks at the deadline instead.
        self._settle_threads = self._most_threads
        self._settle_until = _loops.current().current_time() + SETTLE_TIMEOUT

    async def _look_while_settling(self) -> None:
        if self._settle_until is None:
            return
        if _loops.current().current_time() > self._settle_until:
            self._settle_until = None  # it did not come back: the periodic look carries on
            return
        # Shielded: the call has its outcome, which a cancellation here would lose.
        with _loops.CancelScope(shield=True), _loops.move_on_after(LOOK_TIMEOUT):
            try:
                nthreads = await self._bridge.run(_nthreads, self.client)
            except Exception:  # noqa: BLE001 - the scheduler is away; keep the last view
                return
            self._set_workers(nthreads)

    def _set_workers(self, nthreads: dict[str, int]) -> None:
        self._nthreads = dict(nthreads)
        self._most_threads = max(self._most_threads, sum(nthreads.values()))
        if self._settle_until is not None and sum(nthreads.values()) >= self._settle_threads:
            self._settle_until = None
        # At least one token, so that calls queue here (not on the scheduler)
        # while an adaptive cluster has no worker yet.
        self._limiter.total_tokens = max(1, sum(nthreads.values()))

    async def _follow_workers(self, interval: float) -> None:
        """Resize the limiter as workers join and leave, every ``interval`` seconds."""
        while True:
            await _loops.sleep(interval)
            try:
                nthreads = await self._bridge.run(_nthreads, self.client)
            except Exception:  # noqa: BLE001 - the scheduler is away; keep the last size
                continue
            self._set_workers(nthreads)

    async def _start(self) -> None:
        self._set_workers(await self._bridge.run(_nthreads, self.client))
        name = f"trio_parallel_fs-context-{uuid.uuid4().hex}"
        plugin = _dask_worker.ContextPlugin(self.preload)
        try:
            # Registered once: the scheduler hands it to every worker that joins later.
            await self._bridge.call_client(functools.partial(self.client.register_plugin, plugin, name=name))
        except Exception as exc:  # noqa: BLE001 - whatever the import raised on a worker
            await self._bridge.call_client(functools.partial(self.client.unregister_worker_plugin, name))
            if not self.preload:
                raise
            raise ImportError(
                f"could not preload {list(self.preload)} on the Dask workers: {type(exc).__name__}: {exc}. "
                "The workers import these modules, not this process: install them in the workers' "
                "environment (or fix the module that raised)."
            ) from exc
        self._plugin_name = name

    async def _aclose(self) -> None:
        self._closed = True
        await wait_for_running_calls(lambda: self._running)
        with _loops.CancelScope(shield=True):
            if self._plugin_name is not None:
                try:
                    unregister = functools.partial(self.client.unregister_worker_plugin, self._plugin_name)
                    await self._bridge.call_client(unregister)
                except Exception:  # noqa: BLE001 - a cluster that is gone keeps no plugin
                    pass


def _new_client(address: str, connect_timeout: float) -> Client:
    """``Client(address)``, made in two steps so that a constructor that fails
    still leaves us the half-built client to close.

    A Client whose constructor raised (a malformed address raises ValueError
    before it connects) keeps its event loop thread; nobody holds it, so only
    its ``__del__`` closes it, at interpreter exit, where that close hangs for
    good. And a client whose connection timed out has closed itself, but left
    that thread (and its file descriptors) running.
    """
    client = Client.__new__(Client)
    try:
        client.__init__(address, set_as_default=False, timeout=connect_timeout)  # type: ignore[misc]
    except BaseException:
        _discard(client, connect_timeout)
        raise
    return client


def _discard(client: Client, timeout: float) -> None:
    """Close a client whose constructor failed, and stop its loop thread."""
    half_built: Any = client  # Client's methods are not annotated
    with contextlib.suppress(Exception):  # whatever it got to build
        half_built.close(timeout=timeout)
    # close() returns at once on a client that closed itself (a timed-out
    # connect), without stopping the loop thread it started: stop it here. A
    # runner stops once; stopping it again does nothing.
    runner = getattr(half_built, "_loop_runner", None)
    if runner is not None:
        with contextlib.suppress(Exception):
            runner.stop()


async def _new_client_here(address: str, connect_timeout: float) -> Client:
    """``await Client(address, asynchronous=True)``, on this asyncio loop: no
    thread. A client whose connect fails (or is cancelled) is closed."""
    client = Client(address, asynchronous=True, set_as_default=False, timeout=connect_timeout)  # type: ignore[no-untyped-call]
    try:
        await SameLoopBridge().run(awaited, client)  # cancellable: nothing is ours yet
    except BaseException:
        with contextlib.suppress(Exception):  # whatever it got to build
            await SameLoopBridge().call_client(client.close)
        raise
    return client


async def _connect_to(address: str, connect_timeout: float) -> Client:
    try:
        if _loops.current().name == "asyncio":
            return await _new_client_here(address, connect_timeout)
        return await _loops.to_thread_run_sync(functools.partial(_new_client, address, connect_timeout))
    except ValueError as exc:
        # Dask's own text says what it could not read (the port, the scheme...).
        raise ValueError(
            f"open_dask_context could not read the Dask scheduler address {address!r}: {exc}. "
            "A scheduler's address looks like 'tcp://192.168.1.5:8786': copy the one "
            "`dask scheduler` prints when it starts."
        ) from None
    except OSError as exc:
        # Dask's traceback here is its connection machinery's; its text, and
        # that of the last attempt's error (its cause), say it all.
        evidence = f"{type(exc).__name__}: {exc}"
        if exc.__cause__ is not None:
            evidence += f"; the last attempt: {type(exc.__cause__).__name__}: {exc.__cause__}"
        raise OSError(
            f"open_dask_context could not connect to the Dask scheduler at {address!r} within "
            f"connect_timeout={connect_timeout:g} s ({evidence}). Is the scheduler "
            "running, and listening at that address and port (not a worker's or the dashboard's)? "
            "Is a firewall in the way? A scheduler that is just starting, or far away, may need a "
            "longer connect_timeout."
        ) from None


async def _connect(client_or_address: Client | str, connect_timeout: float) -> tuple[Client, bool]:
    """The client to use, and whether the context owns (and closes) it."""
    if isinstance(client_or_address, str):
        return await _connect_to(client_or_address, connect_timeout), True
    if isinstance(client_or_address, Client):
        # Client says how it was made only through this attribute (its
        # ``asynchronous`` property says whether this thread runs its loop).
        if getattr(client_or_address, "_asynchronous", False) and not runs_here(client_or_address):
            if _loops.current().name == "trio":
                raise TypeError(
                    "open_dask_context under Trio needs a synchronous distributed.Client (its own event "
                    "loop in a thread), not an asynchronous one: make it with Client(address), or pass "
                    "the scheduler's address"
                )
            raise TypeError(
                "the asynchronous distributed.Client given to open_dask_context runs on another event "
                "loop than this one: make it on this loop (await Client(address, asynchronous=True)), "
                "or pass a synchronous Client or the scheduler's address"
            )
        if client_or_address.status != "running":
            raise _loops.closed_resource_error(
                f"the distributed.Client given to open_dask_context is {client_or_address.status!r}, "
                "not 'running'; pass a connected client, or the scheduler's address"
            )
        return client_or_address, False
    raise TypeError(
        "open_dask_context takes a distributed.Client or a scheduler address such as "
        f"'tcp://127.0.0.1:8786', not {type(client_or_address).__name__} {client_or_address!r}"
    )


@asynccontextmanager
async def open_dask_context(
    client_or_address: Client | str,
    *,
    preload: Iterable[str] = (),
    refresh_interval: float = 1.0,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> AsyncIterator[DaskContext]:
    """Open a `DaskContext` that runs jobs on a Dask cluster.

    Args:
        client_or_address: A connected ``distributed.Client``, which the
            context uses and leaves open: a synchronous one, or under asyncio
            also an asynchronous one made on the running loop; or a scheduler
            address (``"tcp://host:8786"``), to which the context connects
            its own client (under asyncio an asynchronous one, on the
            running loop) and closes it at exit.
        preload: Modules every worker imports before its first job: the
            workers there now, and those that join later (a Dask worker
            plugin, removed at exit). A module that fails to import on a
            worker there now raises here.
        refresh_interval: Seconds between looks at the cluster's workers,
            which resize the default limiter.
        connect_timeout: Seconds to wait for the scheduler at an address to
            answer (default 10). It is also the timeout of the context's own
            client for its later connections (``Client(timeout=...)``). Not
            used with a client passed in.

    On exit the context waits for jobs still running in it (not cancellable,
    so hand the context only to tasks inside the block), then removes its
    plugin.

    Raises:
        TypeError: ``client_or_address`` is neither a Client nor a string,
            or is an asynchronous Client of another event loop (any, under
            Trio), or ``preload`` is not a list of module names.
        ValueError: a ``preload`` entry is not an absolute module name.
        ValueError: the address is not one Dask can read (``"127.0.0.1:8786x"``).
        ImportError: a preload failed on a worker; its exception is the cause.
        OSError: the scheduler at the address did not answer within
            ``connect_timeout``.
    """
    modules = preload_modules(preload)
    if not refresh_interval > 0:
        raise ValueError(f"refresh_interval must be a positive number of seconds, not {refresh_interval!r}")
    if not (isinstance(connect_timeout, (int, float)) and connect_timeout > 0):
        raise ValueError(f"connect_timeout must be a positive number of seconds, not {connect_timeout!r}")
    client, owned = await _connect(client_or_address, connect_timeout)
    try:
        context = DaskContext(client, modules, _private=True)
        # Dask's records about our jobs in this process are dropped while the
        # context is open (see _backends/dask/logs); the workers' by the context's plugin.
        with quieted() as context._logs:
            await context._start()
            try:
                async with _loops.current().open_nursery() as nursery:
                    nursery.start_soon(context._follow_workers, refresh_interval)
                    try:
                        yield context
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                await context._aclose()
    finally:
        if owned:
            with _loops.CancelScope(shield=True):
                await bridge_for(client).call_client(client.close)
