"""A map's hold on one pooled worker, with a second job queued behind the first.

Theory of operation
-------------------
`WorkerPool.run` hands a worker one job and puts it back on the idle stack
with the reply, so the next job goes out only after the parent has read that
reply, and the worker waits for it, which with every core busy may be a
scheduler's time slice. A `WorkerLease` keeps one worker (BUSY, counted in
``running``) for as long as a map's lane holds it, and lets the lane send
the next job before the reply to the one running has come (`send` while
one job is in flight, if `can_send_ahead`): the worker finishing job k finds job
k+1 in its socket and starts it at once, while the parent reads k's reply.
Replies come back in order on the one connection, so `receive` pairs them
with the jobs by position. ``run``'s one-job path is untouched.

A job goes ahead only where that cannot hurt (`PooledWorker.can_send_ahead`):
not through the shared memory area (one end writes it at a time), and only
on a Unix socket channel.

A worker that stops with jobs of ours in flight:

* retires with a reply (``max_jobs``, ``max_memory``, the retire hook, an
  argument it held): it never reads another job, so the jobs sent after that
  one never ran. The lease takes another worker and sends them there. (The
  worker does not run them first: ``max_jobs`` and ``max_memory`` would not
  mean what they say, and a retire hook's "leave now" would wait a job.)
* says Bye (its idle timeout fired as a job arrived): it read nothing after
  its last reply, so every job in flight goes to another worker.
* dies: the oldest job in flight was running (unless it never reached the
  worker, as in ``run``: then it goes again); `receive` raises its
  BrokenWorkerError. The jobs behind it never started; they go to another
  worker if the lane asks for their replies, and `drop_unsent` (the map
  failed before them) and `close` drop them.
* is killed (``kill_on_cancel``, KeyboardInterrupt): every job in flight is lost,
  and the exception propagates.

`close` waits for the replies of the jobs sent (a job that runs finishes, as
``run_sync``'s rules have it), drops those that never reached a worker, and
puts the worker back on the idle stack.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from _trio_parallel_fs_worker import protocol as p

from .. import _loops
from .._backends.seam import ANSWER_TIMEOUT
from .._describe import describe
from .._errors import init_failed_error
from .channel import AnswerTimeout, PooledWorker
from .lifecycle import WorkerEvent
from .pool import PoolClosed, WorkerPool

_KEEP = p.Retire.KEEP


class WorkerLease:
    """One pooled worker held for a series of jobs of ``fn`` (see the module)."""

    def __init__(self, pool: WorkerPool, fn: object) -> None:
        self._pool = pool
        self._fn = fn
        self._worker: PooledWorker | None = None
        self._sent: deque[tuple[p.Job, bool]] = deque()  # (job, delivered whole), no reply yet
        self._unsent: deque[p.Job] = deque()  # jobs in flight whose worker left before reading them
        self._counted = False  # counted in the pool's ``running``
        self._closing = False  # in `close`: jobs to send again are dropped, not sent

    def can_send_ahead(self, job: p.Job) -> bool:
        """Whether `send` may send ``job`` now, with a job in flight."""
        worker = self._worker
        return not self._unsent and worker is not None and worker.can_send_ahead(job)

    def drop_unsent(self) -> bool:
        """Drop the oldest job in flight if its worker left without reading
        it (it would go to another worker), or if none is in flight (it was
        lost with a worker killed by an error of the lane's): True if so."""
        if self._sent:
            return False
        if self._unsent:
            self._unsent.popleft()
        return True

    async def send(self, job: p.Job) -> None:
        """Send ``job`` (nothing in flight, or `can_send_ahead` said so).

        Raises PoolClosed if the context is closed, or what starting a worker
        raises. Cancelled (unshielded) or interrupted, it kills the worker.
        """
        ahead = bool(self._sent)
        if self._worker is None:
            await self._take()
        worker = self._worker
        assert worker is not None
        try:
            delivered = await (worker.send_job_ahead(job) if ahead else worker.send_job(job))
        except BaseException:
            await self._kill(worker)
            raise
        self._sent.append((job, delivered))

    async def receive(self) -> Any:
        """The outcome of the oldest job in flight (``.unwrap()`` gives its
        value), once its reply came; a job whose worker left before reading it
        goes to another worker first.

        Raises BrokenWorkerError if its worker died (WorkerHookError if a hook
        raised), PoolClosed if it had to go to another worker and the context
        is closed. The job is settled either way. Cancelled (unshielded) or
        interrupted, it kills the worker: every job in flight is lost.
        """
        pool = self._pool
        while True:
            if not self._sent:
                if self._closing:
                    self._unsent.clear()  # nobody reads their outcomes: they never run
                    return None
                await self._send_again()
            worker = self._worker
            assert worker is not None
            job, delivered = self._sent[0]
            try:
                event = await self._next_event(worker)
            except AnswerTimeout:
                info = worker.process.give_up()
                self._sent.popleft()
                self._left_unread(worker)
                with pool._lock:
                    pool._end(worker, WorkerEvent.DIED, "died")
                raise pool._broken(info, self._fn, worker) from None
            if isinstance(event, p.Closed):
                # With a job queued behind this one, a reset and a clean exit
                # mean this job ended the worker (os._exit(0)), not that it
                # left unread: it must not run again elsewhere.
                queued_behind = len(self._sent) > 1
                self._sent.popleft()
                self._left_unread(worker)
                # Raises BrokenWorkerError, unless the job never reached the
                # worker: then it goes again, as in WorkerPool.run.
                await pool._died(
                    worker, self._fn, fail_call=delivered or not worker.init_done, queued_behind=queued_behind
                )
                self._unsent.appendleft(job)
                continue
            if isinstance(event, p.Bye):
                self._left_unread(worker)
                with pool._lock:
                    pool._end(worker, WorkerEvent.LEFT, "idle")
                continue
            self._sent.popleft()
            if isinstance(event, p.InitFailed):
                self._left_unread(worker)
                with pool._lock:
                    pool._end(worker, WorkerEvent.REPLY_RETIRING, "hook_error")
                raise init_failed_error(event.payload, worker.process.pid, describe(self._fn), pool.config.preload)
            assert isinstance(event, (p.Value, p.Error))
            worker.init_done = True
            retire = event.retire
            # With nothing more in flight, bytes past the reply are (the start
            # of) a Bye, as in WorkerPool._settle; else the next reply's.
            if retire is not _KEEP or (not self._sent and worker.connection.pending > 0):
                self._left_unread(worker)
                with pool._lock:
                    pool._end(worker, WorkerEvent.REPLY_RETIRING, "idle" if retire is _KEEP else retire.reason)
                if retire is not _KEEP:
                    pool._prepare_replacement_soon()
            return pool._outcome(worker, event, self._fn)

    async def close(self) -> None:
        """Wait for the jobs sent (their outcomes dropped), drop those to
        send again, and give the worker back. Shield it from cancellation."""
        self._closing = True
        self._unsent.clear()
        try:
            while self._sent:
                try:
                    await self.receive()
                except Exception:  # noqa: BLE001, S112 - the lane dropped these jobs: their outcome is nobody's
                    pass
                self._unsent.clear()
        finally:
            pool = self._pool
            worker = self._worker
            if worker is not None and self._sent:
                # Interrupted (KeyboardInterrupt) with a reply of ours unread
                # in it: on the idle stack, the next call would read that
                # reply as its own. It goes instead.
                await self._kill(worker)
                worker = None
            self._worker = None
            with pool._lock:
                if worker is not None:
                    worker.apply(WorkerEvent.REPLY)
                    worker.idle_since = time.monotonic()
                    pool._idle.append(worker)
                if self._counted:
                    pool.running -= 1
                    self._counted = False

    # --- the worker -----------------------------------------------------------------

    async def _take(self) -> None:
        """A worker from the pool (as ``run`` takes one), BUSY until `close`."""
        pool = self._pool
        pool._check_fork()
        with pool._lock:
            if pool.closed:
                raise PoolClosed
            if not self._counted:
                pool.running += 1
                self._counted = True
            worker = pool._take_idle()
        if worker is None:
            worker = await pool._new_worker()
        self._worker = worker

    async def _send_again(self) -> None:
        """Send the first job whose worker left without reading it (the lane
        sends none of its own meanwhile: `can_send_ahead` is False)."""
        job = self._unsent[0]
        if self._worker is None:
            try:
                await self._take()
            except BaseException:
                self._unsent.popleft()  # settled: by this exception
                raise
        self._unsent.popleft()
        worker = self._worker
        assert worker is not None
        try:
            delivered = await worker.send_job(job)
        except BaseException:
            await self._kill(worker)
            raise
        self._sent.append((job, delivered))

    def _left_unread(self, worker: PooledWorker) -> None:
        """The worker is leaving: the jobs behind the one it answered last go
        again, in order, and the lease has no worker until it takes one."""
        self._unsent.extendleft(job for job, _ in reversed(self._sent))
        self._sent.clear()
        if self._worker is worker:
            self._worker = None

    async def _next_event(self, worker: PooledWorker) -> p.Event:
        """The worker's next event past Started, as ``WorkerPool._exchange``
        reads it; AnswerTimeout if its start was never confirmed."""
        pool = self._pool
        try:
            while True:
                event = await worker.receive(ANSWER_TIMEOUT)
                pool._announce(worker)
                if not isinstance(event, p.Started):
                    return event
                pool._on_started(worker, event)
        except AnswerTimeout:
            raise
        except BaseException:
            await self._kill(worker)
            raise

    async def _kill(self, worker: PooledWorker) -> None:
        """Nobody will read what is in flight: the worker goes, and with it the jobs."""
        self._sent.clear()
        self._unsent.clear()
        if self._worker is worker:
            self._worker = None
        with _loops.CancelScope(shield=True):
            await self._pool._kill(worker)
