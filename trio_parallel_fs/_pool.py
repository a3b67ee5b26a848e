"""The pool: idle workers, starting new ones, settling each job's reply, closing.

Theory of operation
-------------------
A worker is taken from the idle stack (LIFO: the most recently used worker is
the warmest), or started by the backend. The job goes out; exactly one frame
comes back:

* VALUE / ERROR: the job's outcome. If the flags carry a retire reason the
  worker is leaving, so it is closed instead of going back on the stack; the
  parent never sends a job to a worker that announced it is leaving.
* BYE: the worker's idle timeout fired as the job was being sent. It left
  without reading the job, so the job is resubmitted: a clean idle exit is
  never reported as a crash.
* INIT_FAILED: ``init`` raised; the call fails with WorkerHookError.
* EOF: the worker died. Its exit status comes from the backend (the template
  reaps forked workers and writes their status to a pipe) and the call fails
  with BrokenWorkerError naming the code or signal.

The pool is shared by every ``trio.run`` that uses its context, in any
thread, so it holds no Trio objects: a deque for the idle stack (append and
pop are atomic) and plain counters for the statistics.
"""

from __future__ import annotations

import errno
import math
import os
import pickle
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
import outcome
import trio

from _trio_parallel_fs_worker import _protocol as p

from ._channel import Worker
from ._config import WorkerConfig, WorkerType
from ._describe import describe
from ._errors import BrokenWorkerError, MemoryCeilingError, WorkerHookError, describe_exit, signal_name
from ._process import ExitInfo, WorkerProcess
from ._spawn import SpawnBackend
from ._template import TemplateBackend, remote_error

RESUBMIT = object()

# How long to wait for the exit report of a worker whose channel closed. The
# template reports within milliseconds; this only bounds a hung template.
_EXIT_REPORT_TIMEOUT = 10.0

_HINTS = {
    "SIGKILL": "killed from outside, or by the kernel's OOM killer (see dmesg)",
    "SIGSEGV": "a crash in native code",
    "SIGBUS": "a crash in native code",
    "SIGABRT": "an abort() in native code",
    "SIGTERM": "terminated from outside, e.g. by systemd stopping a unit with "
    "KillMode=control-group",
}


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
            killed from outside), ``hook_error`` (init or retire raised).
        template_pid: The template's pid, or None (not started, or SPAWN).
        preload: The modules the template preloads.
    """

    idle_workers: int
    running_workers: int
    started_workers: int = 0
    retired: dict[str, int] = attrs.field(factory=dict)
    template_pid: int | None = None
    preload: tuple[str, ...] = ()


def broken_worker_error(
    info: ExitInfo, function: str, metric: str, ceiling: int | None, first_job: bool = False
) -> BrokenWorkerError:
    fields: dict[str, Any] = {
        "pid": info.pid,
        "exitcode": info.exitcode,
        "template_died": info.template_died,
        "function": function,
    }
    who = f"worker process {info.pid}" if info.pid is not None else "a worker process"
    if info.ceiling_used is not None and ceiling is not None:
        return MemoryCeilingError(
            f"{who} was killed at the memory ceiling while running {function}: it used "
            f"{info.ceiling_used / 2**20:.1f} MiB ({metric.upper()}), above memory_ceiling="
            f"{ceiling / 2**20:.1f} MiB. Give the job less data, or raise the ceiling.",
            used=info.ceiling_used,
            ceiling=ceiling,
            **fields,
        )
    if info.fork_errno is not None:
        return BrokenWorkerError(
            f"the template could not fork a worker for {function}: "
            f"{os.strerror(info.fork_errno)} ({errno.errorcode.get(info.fork_errno, '?')}). "
            "Too many processes, or too little memory?",
            **fields,
        )
    if info.template_died:
        return BrokenWorkerError(
            f"the template process died while {who} was running {function}, and took "
            "its workers with it. The next call starts a new template.",
            **fields,
        )
    hint = _HINTS.get(signal_name(info.exitcode) or "", "")
    # A new worker runs the init hook before its first job: it may have died in either.
    doing = f"running its init hook or {function}" if first_job else f"running {function}"
    return BrokenWorkerError(
        f"{who} died with {describe_exit(info.exitcode)} while {doing}"
        + (f" ({hint})" if hint else "")
        + ".",
        **fields,
    )


def hook_error(hook: str, payload: bytes, pid: int | None, function: str) -> WorkerHookError:
    """The error for a call whose worker's ``init`` or ``retire`` hook raised
    (the hook's exception, from ``payload``, becomes its cause)."""
    cause = remote_error(payload)
    consequence = (
        f"{function} did not run"
        if hook == "init"
        else f"after running {function}; the job's result is lost and the worker left"
    )
    error = WorkerHookError(
        f"the worker's {hook} hook raised {type(cause).__name__}: {cause}; {consequence}",
        hook=hook,
        pid=pid,
        function=function,
    )
    error.__cause__ = cause
    return error


class WorkerPool:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        settings = config.worker_settings()
        self._config_frame = p.encode_frame(p.CONFIG, pickle.dumps(settings))
        self._backend: TemplateBackend | SpawnBackend
        if config.worker_type is WorkerType.SPAWN:
            self._backend = SpawnBackend(config.blas_threads)
        else:
            self._backend = TemplateBackend(config.template_setup(), config.blas_threads)
        self._idle: deque[Worker] = deque()
        self._departing: list[WorkerProcess] = []
        self.running = 0
        self.closed = False
        self._started = 0
        self._retired: dict[str, int] = {}
        self._live: dict[int, Worker] = {}  # id(worker) -> worker, idle or busy
        self.observers: list[Callable[[int], None]] = []  # see _introspect.watch_workers

    # --- statistics ---------------------------------------------------------

    def _retire(self, worker: Worker, reason: str) -> None:
        """Count why ``worker`` left, and let it go."""
        self._retired[reason] = self._retired.get(reason, 0) + 1
        self._let_go(worker)

    def statistics(self) -> WorkerContextStatistics:
        self.prune()
        return WorkerContextStatistics(
            idle_workers=len(self._idle),
            running_workers=self.running,
            started_workers=self._started,
            retired=dict(self._retired),
            template_pid=self._backend.template_pid,
            preload=self.config.preload,
        )

    # --- workers in and out -------------------------------------------------

    async def start(self) -> None:
        """Start the template now, so that preload errors surface here."""
        await self._backend.ensure_started()

    def _take_idle(self) -> Worker | None:
        now = time.monotonic()
        while self._idle:
            try:
                worker = self._idle.pop()
            except IndexError:  # another thread took the last one
                return None
            if now - worker.idle_since >= self.config.idle_timeout:
                # Its own idle timeout has (almost certainly) made it leave.
                self._retire(worker, "idle")
            elif worker.process.has_exited():
                # Died while idle (killed, or its template died): the job has not
                # been sent, so it goes to another worker instead of failing.
                self._retire_exited(worker)
            else:
                return worker
        return None

    def prune(self) -> None:
        """Drop idle workers that have left (by their idle timeout, or killed).
        This also reaps spawned workers, which would otherwise stay zombies
        until the next call."""
        for worker in list(self._idle):
            if worker.process.has_exited():
                try:
                    self._idle.remove(worker)
                except ValueError:  # another thread took it meanwhile
                    continue
                self._retire_exited(worker)
        self._reap_departing()

    async def _new_worker(self) -> Worker:
        self.prune()
        await self._backend.ensure_started()
        try:
            channel, process = self._backend.start_worker()
        except OSError:
            # The template died since we looked: start a new one, once.
            await self._backend.ensure_started()
            channel, process = self._backend.start_worker()
        self._started += 1
        worker = Worker(channel, process, self._config_frame)
        self._live[id(worker)] = worker
        self._announce(worker)
        return worker

    def _announce(self, worker: Worker) -> None:
        if self.observers and not worker.announced and worker.process.pid is not None:
            worker.announced = True
            for observer in self.observers:
                observer(worker.process.pid)

    def worker_pids(self) -> list[int]:
        """Pids of the workers this pool holds (idle or busy), where known."""
        return [pid for worker in list(self._live.values()) if (pid := worker.process.pid) is not None]

    def _retire_exited(self, worker: Worker) -> None:
        """An idle worker found gone: by its idle timeout if it exited cleanly."""
        self._retire(worker, "idle" if worker.process.exited_cleanly() else "died")

    def _let_go(self, worker: Worker) -> None:
        self._live.pop(id(worker), None)
        worker.close_channel()
        if not worker.process.release():
            self._departing.append(worker.process)

    def _reap_departing(self) -> None:
        if self._departing:
            self._departing = [proc for proc in self._departing if not proc.release()]

    # --- one job ------------------------------------------------------------

    async def run(self, job_frame: list[bytes | memoryview], fn: object) -> Any:
        """Run one job; return its outcome, or RESUBMIT if it never ran."""
        worker = self._take_idle() or await self._new_worker()
        try:
            reply = await worker.exchange(job_frame)
            self._announce(worker)
        except BaseException:
            # Cancelled with kill_on_cancel, or KeyboardInterrupt: nobody will
            # read this job's result, so the worker goes.
            with trio.CancelScope(shield=True):
                worker.process.kill()
                with trio.move_on_after(_EXIT_REPORT_TIMEOUT):
                    await worker.process.wait()
                self._retire(worker, "killed")
            raise
        return await self._settle(worker, reply, fn)

    async def _settle(self, worker: Worker, reply: tuple[int, int, bytes] | None, fn: object) -> Any:
        if reply is None:
            function = describe(fn)
            with trio.CancelScope(shield=True):
                info = ExitInfo(pid=worker.process.pid, exitcode=None)
                with trio.move_on_after(_EXIT_REPORT_TIMEOUT):
                    info = await worker.process.wait()
            self._retire(worker, "ceiling" if info.ceiling_used is not None else "died")
            raise broken_worker_error(
                info,
                function,
                self.config.memory_metric,
                self.config.memory_ceiling,
                first_job=worker.served == 0 and self.config.init is not bool,
            )
        kind, flags, payload = reply
        if kind == p.BYE:
            self._retire(worker, "idle")
            return RESUBMIT
        if kind == p.INIT_FAILED:
            self._retire(worker, "hook_error")
            raise hook_error("init", payload, worker.process.pid, describe(fn))
        if flags == p.KEEP and worker.said_bye:
            self._retire(worker, "idle")
        elif flags == p.KEEP:
            worker.idle_since = time.monotonic()
            self._idle.append(worker)
        else:
            self._retire(worker, p.RETIRE_REASONS[flags])
        if flags == p.RETIRE_HOOK_FAILED:
            raise hook_error("retire", payload, worker.process.pid, describe(fn))
        if kind == p.ERROR:
            return outcome.Error(remote_error(payload))
        try:
            if kind == p.VALUE_BUFFERS:
                pickled, buffers = p.split_buffers(payload)
                return outcome.Value(pickle.loads(pickled, buffers=buffers))
            return outcome.Value(pickle.loads(payload))
        except BaseException as exc:  # noqa: BLE001
            error = TypeError(
                f"the result of {describe(fn)} could not be unpickled in the parent: "
                f"{type(exc).__name__}: {exc}"
            )
            error.__cause__ = exc
            return outcome.Error(error)

    # --- closing --------------------------------------------------------------

    def close_blocking(self, grace_period: float) -> None:
        """Stop idle workers, wait up to ``grace_period`` for them, kill stragglers,
        stop the template. Raises BrokenWorkerError if anything had to be killed."""
        self.closed = True
        self._live.clear()
        processes: list[WorkerProcess] = []
        while self._idle:
            worker = self._idle.pop()
            worker.close_channel()
            processes.append(worker.process)
        processes.extend(self._departing)
        self._departing = []
        deadline = time.monotonic() + grace_period
        stuck = []
        for process in processes:
            remaining = max(deadline - time.monotonic(), 0.0) if not math.isinf(grace_period) else math.inf
            if process.wait_blocking(remaining) is None:
                process.kill()
                stuck.append(process)
        for process in stuck:
            process.wait_blocking(_EXIT_REPORT_TIMEOUT)
        for process in processes:
            process.release()
        self._backend.close(_EXIT_REPORT_TIMEOUT)
        if stuck:
            pids = ", ".join(str(process.pid) for process in stuck)
            raise BrokenWorkerError(
                f"{len(stuck)} worker(s) (pid {pids}) did not exit within "
                f"grace_period={grace_period}s after their context closed, and were killed"
            )
