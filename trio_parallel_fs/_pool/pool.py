"""The pool: idle workers, starting new ones, settling each job's reply, closing.

Theory of operation
-------------------
The pool is handed a backend (`_backends.seam.Backend`) and never asks what kind it
is. A worker is taken from the idle stack (LIFO: the most recently used worker
is the warmest), or started by the backend. The job goes out; then events come
back until one settles the call (see `channel.PooledWorker.receive`):

* Started: the worker's init hook returned (and, if it carries a figure, the
  worker already uses more than ``max_memory``: warn once). Keep reading.
* Value / Error: the job's outcome. If it carries a retire reason the worker
  is leaving, so it is let go instead of going back on the stack; the parent
  never sends a job to a worker that announced it is leaving. Bytes already
  received after the reply can only be (the start of) a Bye: it is leaving too.
* Bye: the worker's idle timeout fired as the job was being sent. It left
  without reading the job, so the job is resubmitted: a clean idle exit is
  never reported as a crash. (A send that fails because the worker closed
  its end is followed by a read too: the Bye is there. On Windows the Bye
  can be lost to the reset the worker's exit with our job unread causes: a
  reset and a clean exit count as that Bye.)
* InitFailed: ``init`` raised; the call fails with WorkerHookError (with
  TemplateStartError where a spawned worker's own preload failed, as the
  template's would have).
* Closed: the worker died (its channel reached end-of-file; processes its job
  forked dropped their copies, see ``channel``). The call fails with
  BrokenWorkerError naming the exit code or signal, from the backend's exit
  report.

Each worker's state follows the table in `lifecycle`; states, the idle stack,
the counters and the context's own state change under one lock, because a
context (the default one above all) is shared by every thread's ``trio.run``.
The pool holds no Trio objects for the same reason.

Where workers import the preload themselves (spawned: no template), the
first one starts when the context opens, so that a failing preload raises
there as it does with a template; it then waits on the idle stack in STARTING.

A worker that retires with its result gets its successor asked for at once
where the backend can do that cheaply (the template), so that the next call
finds it ready; it waits on the idle stack in STARTING.

A process forked from the parent inherits the pool. It must never touch the
parent's template, workers or channels, so the pool notices the fork (a
generation counter an at-fork hook bumps) and forgets them all, closing only
its own copies of the fds, before it serves.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import attrs
import cloudpickle
import outcome

from _trio_parallel_fs_worker import protocol as p
from _trio_parallel_fs_worker._settings import WorkerSettings
from _trio_parallel_fs_worker._shm import unsupported_reason
from _trio_parallel_fs_worker.codec import decode_error, loads_value

from .. import _loops
from .._backends.seam import ANSWER_TIMEOUT, Backend, ExitInfo, WorkerProcess
from .._config import WorkerConfig
from .._describe import describe
from .._errors import (
    PREPARE_FAILED,
    TemplateStartError,
    baseline_above_max_memory_message,
    broken_worker_error,
    hook_error,
    init_failed_error,
    preload_failure,
    stuck_at_close_error,
    template_start_error,
    unpicklable_result_error,
)
from .channel import AnswerTimeout, PooledWorker
from .lifecycle import ContextEvent, ContextState, WorkerEvent, WorkerState, next_context_state

RESUBMIT = object()

# Enum members the warm path uses, bound to globals: on Python 3.11 looking a
# member up on its Enum class costs about 140 ns, ten times a global.
_OPEN = ContextState.OPEN
_STARTING = WorkerState.STARTING
_SEND_JOB, _REPLY, _REPLY_RETIRING = WorkerEvent.SEND_JOB, WorkerEvent.REPLY, WorkerEvent.REPLY_RETIRING
_KEEP, _HOOK_FAILED = p.Retire.KEEP, p.Retire.HOOK_FAILED

# Bumped in the child of every fork of this process: a pool made in another
# generation is the parent's, and must be forgotten (a counter, not a getpid()
# syscall on every call).
_fork_generation = 0


# Every pool of this process, so that a forked child can drop them at once.
_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """In a child forked from this process (a multiprocessing worker, say):
    close our copies of every pool's channels and pipes now. Kept open, they
    would hold the workers' channels open for as long as the child lives: a
    closing context would see no worker leave, wait its whole grace period,
    kill them and raise; and the template would not see its parent die."""
    global _fork_generation
    _fork_generation += 1
    for pool in list(_pools):
        try:
            pool._forget_after_fork()
        except Exception:  # noqa: BLE001 - a fork hook must not fail the fork; the next use forgets again
            pool._generation = -1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class PoolClosed(Exception):
    """The pool refused a job because its context is closing or closed."""


@attrs.frozen
class WorkerContextStatistics:
    """A snapshot of a worker context.

    Attributes:
        idle_workers: Live workers waiting for a job.
        running_workers: Workers running a job now.
        started_workers: Workers started so far.
        retired: How many workers left, by reason: ``jobs`` (max_jobs),
            ``memory`` (max_memory), ``user`` (the retire hook said so),
            ``idle`` (idle timeout), ``ceiling`` (killed at memory_ceiling),
            ``killed`` (cancelled with kill_on_cancel), ``died`` (crashed or
            killed from outside), ``hook_error`` (init or retire raised),
            ``area`` (a job kept a reference to an argument that came through
            the shared memory area, which the next job would overwrite).
        template_pid: The template's pid, or None (not started, or SPAWN).
        preload: The modules the template preloads.
        shared_memory_bytes: The memory the live workers' shared memory areas
            hold now (see ``shm_threshold``): it drops when an idle area is
            trimmed (docs/bigdata.rst). Not counted against ``max_memory``.
        lent_result_bytes: Bytes of results lent to the caller from the live
            workers' areas and still alive (part of ``shared_memory_bytes``).
        kept_result_bytes: Memory of this process kept for the live workers'
            next large results copied out of an area (results are lent, not
            copied, unless a worker put one outside the place it was given):
            usually 0; released with the area, or when it is trimmed.
        prepared_workers: Workers started ahead of demand, in place of one
            that retired after its job (``max_jobs``, ``max_memory``, the
            retire hook), or (``SPAWN`` with a preload) the first one, started
            at the open; the next call will use it. Not counted in
            ``idle_workers`` or ``started_workers`` until then.
    """

    idle_workers: int
    running_workers: int
    started_workers: int = 0
    retired: dict[str, int] = attrs.field(factory=dict)
    template_pid: int | None = None
    preload: tuple[str, ...] = ()
    shared_memory_bytes: int = 0
    prepared_workers: int = 0
    kept_result_bytes: int = 0
    lent_result_bytes: int = 0


class WorkerPool:
    def __init__(self, config: WorkerConfig, backend: Backend) -> None:
        self.config = config
        self.backend = backend
        self._hooks = cloudpickle.dumps(config.worker_hooks())
        self._lock = threading.Lock()
        self._state = ContextState.OPEN
        self._idle: list[PooledWorker] = []
        self._live: set[PooledWorker] = set()  # every worker not GONE or DEAD
        self._departing: list[WorkerProcess] = []  # let go, not reaped yet
        self.running = 0
        self._started = 0
        self._retired: dict[str, int] = {}
        self._warned_baseline = False
        # A worker of ours said it had preloaded (Started): from then on a
        # worker that dies before saying so is a broken worker, not a failed
        # start (see _broken).
        self._preloaded = False
        self._generation = _fork_generation
        _pools.add(self)
        self.observers: list[Callable[[int], None]] = []  # see _introspect.watch_workers
        # (threshold, cap, idle period) of each worker's shared memory area, or None for none.
        self._area_settings = (
            (config.shm_threshold, config.shm_max, config.shm_idle)
            if config.shm_max and unsupported_reason() is None
            else None
        )

    @property
    def closed(self) -> bool:
        return self._state is not _OPEN

    # --- statistics ---------------------------------------------------------

    def statistics(self) -> WorkerContextStatistics:
        self._check_fork()
        self.prune()
        with self._lock:
            return WorkerContextStatistics(
                idle_workers=sum(1 for worker in self._idle if worker.state is not _STARTING),
                running_workers=self.running,
                started_workers=self._started,
                retired=dict(self._retired),
                template_pid=self.backend.template_pid,
                preload=self.config.preload,
                shared_memory_bytes=sum(worker.area_size for worker in self._live),
                kept_result_bytes=sum(worker.kept_result_bytes for worker in self._live),
                lent_result_bytes=sum(worker.lent_result_bytes for worker in self._live),
                prepared_workers=sum(1 for worker in self._idle if worker.state is _STARTING),
            )

    def worker_pids(self) -> list[int]:
        """Pids of the workers this pool holds (idle or busy), where known."""
        with self._lock:
            workers = list(self._live)
        return [pid for worker in workers if (pid := worker.process.pid) is not None]

    def _announce(self, worker: PooledWorker) -> None:
        if self.observers and not worker.announced and worker.process.pid is not None:
            worker.announced = True
            for observer in self.observers:
                observer(worker.process.pid)

    # --- after a fork of the parent ----------------------------------------------

    def _check_fork(self) -> None:
        if self._generation != _fork_generation:
            self._forget_after_fork()

    def _forget_after_fork(self) -> None:
        """We are a child forked from the process that made this pool: drop every
        inherited worker, closing only our copies of their fds."""
        self._lock = threading.Lock()  # another thread may have held it at the fork
        for worker in self._live:
            worker.forget_after_fork()
            worker.process.forget()
        for process in self._departing:
            process.forget()
        self._live.clear()
        self._idle.clear()
        self._departing.clear()
        self.running = 0
        self.backend.forget_after_fork()
        self._generation = _fork_generation

    # --- workers in and out -------------------------------------------------

    async def start(self) -> None:
        """Start the template now, so that preload errors surface here; where
        workers import the preload themselves, the first worker (see
        `_start_first_worker`)."""
        await self.backend.start()
        if self.config.preloads_in_each_worker:
            try:
                settings = self._worker_settings()
            except OSError:  # the working directory is gone; the first call's start says so
                return
            await self._start_first_worker(settings)

    async def _start_first_worker(self, settings: WorkerSettings) -> None:
        """Start a worker that imports the preload itself (spawned) and wait
        until it says it has (Started): a failing preload or ``template_init``
        raises TemplateStartError here, as a template's does, instead of at
        the first call. The worker then waits for that call on the idle stack,
        in STARTING, as one prepared ahead does. An init hook that raises is
        the first call's to report, as with the template: it starts another
        worker, whose init raises again (the one here is not counted in
        ``retired``)."""
        channel, process = await self.backend.start_worker()
        worker = self._adopt(channel, process, settings, for_job=False)
        try:
            await worker.send_settings()
            event = await worker.receive(ANSWER_TIMEOUT)
        except BaseException:  # cancelled (Ctrl-C, a timeout around the open): it goes
            with _loops.CancelScope(shield=True):
                await self._kill(worker)
            raise
        self._announce(worker)
        if isinstance(event, p.Started):
            self._on_started(worker, event)
            with self._lock:
                if worker.state is _STARTING:  # not closed meanwhile
                    worker.idle_since = time.monotonic()
                    self._idle.append(worker)
            return
        if isinstance(event, p.InitFailed):
            with self._lock:
                self._end(worker, WorkerEvent.DIED, None)
            error = preload_failure(decode_error(event.payload), worker.process.pid, self.config.preload)
            if error is not None:
                raise error
            return
        info = await self._died(worker, None, fail_call=False)  # Closed: it died while preloading
        raise self._start_failed(info)

    def _start_failed(self, info: ExitInfo) -> TemplateStartError:
        """A worker that preloads itself died before it said it had (Started)."""
        return template_start_error(
            self.config.preload,
            pid=info.pid,
            exitcode=info.exitcode,
            spawned=True,
            ceiling_used=info.ceiling_used,
            metric=self.config.memory_metric,
        )

    def _end(self, worker: PooledWorker, event: WorkerEvent, reason: str | None) -> None:
        """Apply ``event`` (it left, died, was killed, or said it is leaving),
        count why (``reason``; None: not counted), close our end and stop
        tracking it; the backend reaps it, spawned workers later (the caller
        holds the lock)."""
        worker.apply(event)
        if reason is not None:
            self._retired[reason] = self._retired.get(reason, 0) + 1
        self._live.discard(worker)
        self._let_go(worker)

    def _let_go(self, worker: PooledWorker) -> None:
        worker.close()
        if not worker.process.release():
            self._departing.append(worker.process)

    def _take_idle(self) -> PooledWorker | None:
        """An idle worker that is still there, marked BUSY; None if there is none
        (the caller holds the lock)."""
        now = time.monotonic()
        idle_timeout = self.config.idle_timeout
        while self._idle:
            worker = self._idle.pop()
            if now - worker.idle_since >= idle_timeout:
                # Its own idle timeout has (almost certainly) made it leave.
                self._end(worker, WorkerEvent.LEFT, "idle")
            elif worker.process.has_exited():
                # Died while idle (killed, or its template died): the job has not
                # been sent, so it goes to another worker instead of failing.
                self._end_exited(worker)
            elif worker.state is _STARTING and worker.cwd != os.getcwd():
                # Prepared ahead, in the working directory of that moment; the
                # caller has moved since, and a worker starts where its caller is.
                worker.apply(WorkerEvent.CLOSE)
                self._live.discard(worker)
                self._let_go(worker)
            else:
                if worker.state is _STARTING:  # prepared ahead: its first job
                    self._started += 1
                worker.apply(_SEND_JOB)
                return worker
        return None

    def _end_exited(self, worker: PooledWorker) -> None:
        """An idle worker found gone: by its idle timeout if it exited cleanly."""
        if worker.process.exited_cleanly():
            self._end(worker, WorkerEvent.LEFT, "idle")
        else:
            self._end(worker, WorkerEvent.DIED, "died")

    def prune(self) -> None:
        """Drop idle workers that have left (by their idle timeout, or killed).
        This also reaps spawned workers, which would otherwise stay zombies
        until the next call."""
        with self._lock:
            for worker in [w for w in self._idle if w.process.has_exited()]:
                self._idle.remove(worker)
                self._end_exited(worker)
            if self._departing:
                self._departing = [process for process in self._departing if not process.release()]

    def _worker_settings(self) -> WorkerSettings:
        """The start-up message of a worker started now (the cwd is this moment's)."""
        return self.config.worker_settings(self._hooks)

    async def _new_worker(self) -> PooledWorker:
        self.prune()
        await self.backend.start()
        settings = self._worker_settings()  # first: it fails if the working directory is gone
        try:
            channel, process = await self.backend.start_worker()
        except OSError:
            # The template died since we looked: start a new one, once.
            await self.backend.start()
            channel, process = await self.backend.start_worker()
        worker = self._adopt(channel, process, settings, for_job=True)
        self._announce(worker)
        return worker

    def _adopt(
        self, channel: socket.socket, process: WorkerProcess, settings: WorkerSettings, for_job: bool
    ) -> PooledWorker:
        """Track a worker just started; ``for_job``: a job goes to it now (it
        counts as started, and is BUSY). Raises PoolClosed if the context
        closed while it started: nothing would ever close it."""
        worker = PooledWorker(channel, process, settings, self._area_settings, self.config.busy_wait)
        with self._lock:
            if self.closed:
                worker.process.kill()
                self._let_go(worker)
                raise PoolClosed
            self._live.add(worker)
            if for_job:
                self._started += 1
                worker.apply(_SEND_JOB)
        return worker

    def _prepare_replacement_soon(self) -> None:
        """A worker just retired after its job (max_jobs, max_memory, the retire
        hook): have its successor prepared (`_prepare_replacement`) as soon as
        this task lets Trio run anything else. Not right now: that costs about
        a quarter of a millisecond, which the caller of the retiring worker's
        job need not wait for."""
        _loops.spawn_system_task(self._prepare_replacement_task, name="trio_parallel_fs prepare a worker")

    async def _prepare_replacement_task(self) -> None:
        self._prepare_replacement()

    def _prepare_replacement(self) -> None:
        """Ask for a worker ahead of demand, where that is cheap (a fork request
        to the template), so that it is forked and handed its channel while
        nobody waits. With ``max_jobs=1`` the next call then finds a fresh
        worker ready, instead of paying the template's and the spare's
        wake-ups. It waits on the idle stack in STARTING and counts as started
        from its first job on. Its settings go out at once, so that it applies
        them and runs its init hook while nobody waits; they carry the working
        directory of this moment, and if the caller has moved by the time it
        is needed, it is let go for a worker started there.

        Runs in a Trio system task, where an exception would end the whole
        run: a failure here only means that the next call starts its own worker."""
        try:
            try:
                settings = self.config.worker_settings(self._hooks)
            except OSError:  # the working directory is gone; the next call's start says so
                return
            started = self.backend.start_worker_now()
            if started is None:
                return
            channel, process = started
            worker = PooledWorker(channel, process, settings, self._area_settings, self.config.busy_wait)
            worker.send_ahead()
            with self._lock:
                if self.closed:
                    worker.process.kill()
                    self._let_go(worker)
                    return
                self._live.add(worker)
                worker.idle_since = time.monotonic()
                self._idle.append(worker)
        except Exception as exc:  # noqa: BLE001 - see above
            warnings.warn(f"{PREPARE_FAILED}: {exc!r}", RuntimeWarning, stacklevel=1)

    # --- one job ------------------------------------------------------------

    async def run(self, job: p.Job, fn: object) -> Any:
        """Run one job; return its outcome, or RESUBMIT if it never ran.

        Raises PoolClosed if the context is closed (or closes while a new
        worker starts for this job).
        """
        with self._lock:
            if self._generation != _fork_generation:
                self._forget_after_fork()
            if self.closed:
                raise PoolClosed
            self.running += 1
            worker = self._take_idle()
        try:
            if worker is None:
                worker = await self._new_worker()
            event, delivered = await self._exchange(worker, job, fn)
            if isinstance(event, p.Closed):
                # A worker that had served before and was gone before the job
                # reached it (killed while idle, its exit not reported yet): the
                # job never ran, and goes elsewhere. A new worker that dies
                # before its first job fails the call (its next would too).
                await self._died(worker, fn, fail_call=delivered or not worker.init_done)
                with self._lock:
                    self.running -= 1
                return RESUBMIT
        except BaseException:
            with self._lock:
                self.running -= 1
            raise
        return self._settle(worker, event, fn)  # decrements running

    async def _exchange(self, worker: PooledWorker, job: p.Job, fn: object) -> tuple[p.Event, bool]:
        """Send the job; return the event that settles it, and whether the job
        was delivered whole (if not, the worker had closed its end before)."""
        try:
            delivered = await worker.send_job(job)  # if it closed its end, its Bye may be waiting
            while True:
                event = await worker.receive(ANSWER_TIMEOUT)
                self._announce(worker)
                if not isinstance(event, p.Started):
                    break
                self._on_started(worker, event)
        except AnswerTimeout:
            info = worker.process.give_up()
            with self._lock:
                self._end(worker, WorkerEvent.DIED, "died")
            raise self._broken(info, fn, worker) from None
        except BaseException:
            # Cancelled with kill_on_cancel, or KeyboardInterrupt: nobody will
            # read this job's result, so the worker goes.
            with _loops.CancelScope(shield=True):
                await self._kill(worker)
            raise
        return event, delivered

    async def _kill(self, worker: PooledWorker) -> None:
        worker.process.kill()
        with _loops.move_on_after(ANSWER_TIMEOUT):
            await worker.process.wait()
        if not worker.process.has_exited():
            worker.process.give_up()  # its template did not answer the kill
        with self._lock:
            self._end(worker, WorkerEvent.KILL, "killed")

    def _on_started(self, worker: PooledWorker, event: p.Started) -> None:
        """The worker set itself up and its init hook returned (Started)."""
        worker.init_done = True
        self._preloaded = True
        if event.memory >= 0:
            self._warn_baseline(worker, event.memory)

    def _warn_baseline(self, worker: PooledWorker, used: int) -> None:
        if self._warned_baseline or self.config.max_memory is None:
            return
        self._warned_baseline = True
        message = baseline_above_max_memory_message(
            worker.process.pid, used, self.config.max_memory, self.config.memory_metric
        )
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _broken(self, info: ExitInfo, fn: object, worker: PooledWorker) -> BaseException:
        config = self.config
        if not (worker.init_done or self._preloaded) and config.preloads_in_each_worker and config.init is bool:
            # No worker of ours has preloaded yet and this one died trying (a
            # default context's first call: no open waited for it), as a
            # template that dies would.
            return self._start_failed(info)
        return broken_worker_error(
            info,
            describe(fn),
            self.config.memory_metric,
            self.config.memory_ceiling,
            in_init=not worker.init_done and self.config.init is not bool,
        )

    async def _died(
        self, worker: PooledWorker, fn: object, fail_call: bool = True, queued_behind: bool = False
    ) -> ExitInfo:
        """The worker's channel closed: wait for its exit report, let it go and,
        with ``fail_call``, raise the BrokenWorkerError that says how it died;
        without, return that report.
        ``queued_behind``: a job of ours waited unread behind the one it ran
        (a map's lease), so a reset says nothing about that one."""
        # All of it shielded: under asyncio a cancel held off by the shield is
        # raised as it is left, and the worker must be let go and counted first.
        with _loops.CancelScope(shield=True):
            info = ExitInfo(pid=worker.process.pid, exitcode=None)
            try:
                with _loops.move_on_after(ANSWER_TIMEOUT):
                    info = await worker.process.wait()
                if not worker.process.has_exited():
                    # Its channel closed, yet it lives on: its job closed the
                    # channel's fd (os.closerange) and runs on. Kill it alone;
                    # give up on its template only if that is not answered.
                    worker.process.kill()
                    with _loops.move_on_after(ANSWER_TIMEOUT):
                        info = attrs.evolve(await worker.process.wait(), channel_closed=True)
                if not worker.process.has_exited():
                    info = worker.process.give_up()
            except BaseException:
                # Interrupted (KeyboardInterrupt: the shield holds off only
                # cancellation): let it go all the same, or it stays BUSY
                # with its channel open, which no close would end.
                with self._lock:
                    self._end(worker, WorkerEvent.DIED, "died")
                raise
            # A worker that exits while data of ours waits unread in its socket
            # resets the connection, and on Windows the reset drops what it sent
            # last and we had not read yet: the Bye of a worker whose idle timeout
            # fired as the job arrived. A reset and a clean exit say the same as
            # that Bye: the job was never read (a job that ends its worker with
            # exit code 0 has read everything we sent, so its exit brings no reset).
            left_unread = worker.reset_seen and worker.init_done and info.exitcode == 0 and not queued_behind
            with self._lock:
                if left_unread:
                    self._end(worker, WorkerEvent.LEFT, "idle")
                else:
                    self._end(worker, WorkerEvent.DIED, "ceiling" if info.ceiling_used is not None else "died")
            if fail_call and not left_unread:
                raise self._broken(info, fn, worker)
        return info

    def _settle(self, worker: PooledWorker, event: p.Event, fn: object) -> Any:
        """Apply a reply to the worker's state and the counters (one lock, which
        also counts the call out of ``running``); its outcome, or RESUBMIT."""
        if isinstance(event, p.Bye):
            with self._lock:
                self.running -= 1
                self._end(worker, WorkerEvent.LEFT, "idle")
            return RESUBMIT
        if isinstance(event, p.InitFailed):
            with self._lock:
                self.running -= 1
                self._end(worker, _REPLY_RETIRING, "hook_error")
            raise init_failed_error(event.payload, worker.process.pid, describe(fn), self.config.preload)
        assert isinstance(event, (p.Value, p.Error))
        worker.init_done = True
        retire = event.retire
        replace = False
        # Anything received past the reply is (the start of) a Bye: it is leaving.
        leaving = worker.connection.pending > 0
        with self._lock:
            self.running -= 1
            if retire is not _KEEP:
                self._end(worker, _REPLY_RETIRING, retire.reason)
                replace = True
            elif leaving:
                self._end(worker, _REPLY_RETIRING, "idle")
            else:
                worker.apply(_REPLY)
                worker.idle_since = time.monotonic()
                self._idle.append(worker)
        if replace:
            self._prepare_replacement_soon()
        return self._outcome(worker, event, fn)

    def _outcome(self, worker: PooledWorker, event: p.Value | p.Error, fn: object) -> Any:
        """A reply's outcome (the worker's state is settled already); raises
        WorkerHookError if its retire hook raised."""
        if event.retire is _HOOK_FAILED:
            assert isinstance(event, p.Error)
            raise hook_error("retire", decode_error(event.payload), worker.process.pid, describe(fn))
        if isinstance(event, p.Error):
            return outcome.Error(decode_error(event.payload))
        try:
            return outcome.Value(loads_value(event.pickled, event.buffers))
        except KeyboardInterrupt:
            raise  # Ctrl-C landed while unpickling (or the result says so): not the result's failure
        except BaseException as exc:  # noqa: BLE001
            return outcome.Error(unpicklable_result_error(describe(fn), exc))

    # --- closing --------------------------------------------------------------

    def close_blocking(self, grace_period: float) -> None:
        """Stop idle workers, wait up to ``grace_period`` for them, kill stragglers,
        stop the template. Raises BrokenWorkerError if anything had to be killed.
        A second close does nothing."""
        with self._lock:
            if self._generation != _fork_generation:
                self._forget_after_fork()
                self._state = ContextState.CLOSED
                return
            if self._state is not ContextState.OPEN:
                return
            self._state = next_context_state(self._state, ContextEvent.CLOSE)
            closing = [w for w in self._live if w.state in (WorkerState.IDLE, WorkerState.STARTING)]
            for worker in closing:
                worker.apply(WorkerEvent.CLOSE)
                worker.close()
            self._idle.clear()
            processes = [worker.process for worker in closing] + self._departing
            self._departing = []
        deadline = time.monotonic() + grace_period
        stuck = []
        for process in processes:
            remaining = max(deadline - time.monotonic(), 0.0) if not math.isinf(grace_period) else math.inf
            if process.wait_blocking(remaining) is None:
                process.kill()
                stuck.append(process)
        for process in stuck:
            if process.wait_blocking(ANSWER_TIMEOUT) is None:
                process.give_up()
        for process in processes:
            process.release()
        with self._lock:
            for worker in closing:
                worker.apply(WorkerEvent.KILL if worker.process in stuck else WorkerEvent.LEFT)
                self._live.discard(worker)
        self.backend.close(ANSWER_TIMEOUT)
        with self._lock:
            self._state = next_context_state(self._state, ContextEvent.CLOSED)
        if stuck:
            raise stuck_at_close_error([process.pid for process in stuck], grace_period)
