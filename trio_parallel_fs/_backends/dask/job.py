"""One job's life on the Dask client's event loop, and how it ends for its caller.

`run_job` runs on the client's loop (see ``bridge``): it submits the job,
waits for it, fetches the result, and reduces it all to a `Settled` record.
`unwrap` runs in the calling task and turns the record into the value, the
job's own exception with its remote traceback, or `BrokenWorkerError` when
the worker died under the job.

With a synchronous client (its loop in a thread), submitting on the loop
rather than from the caller's thread saves one wake-up of the loop thread per
call (measured: some 4 ms of 13 on a two-worker LocalCluster), and leaves the
caller's thread free while Dask pickles arguments. An asynchronous client's
loop is the caller's: there `run_job` is a task of that loop.
"""

from __future__ import annotations

import traceback
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any

import attrs
from dask.utils import funcname
from distributed.scheduler import KilledWorker

# The public names: the private modules behind them may move.
from ... import BrokenWorkerError, RemoteTraceback
from ..._calls import find_unpicklable
from ..._describe import describe
from ..._errors import unpicklable_job_error
from .worker import JOB_KEY_PREFIX

VALUE = "value"
ERROR = "error"
CANCELLED = "cancelled"
UNPICKLABLE = "unpicklable"


def job_key(fn: Callable[..., Any]) -> str:
    """A new task key for a job of ``fn``: Dask's own form for ``pure=False``
    (the function's name, a random part), after `JOB_KEY_PREFIX`."""
    return f"{JOB_KEY_PREFIX}{funcname(fn)}-{uuid.uuid4().hex}"


@attrs.define
class Job:
    """A job, its task key and, once submitted, its Dask future."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    key: str = attrs.field(default=attrs.Factory(lambda self: job_key(self.fn), takes_self=True))
    future: Any = None


@attrs.frozen
class Settled:
    """How a job ended: ``kind`` is `VALUE`, `ERROR`, `CANCELLED` or `UNPICKLABLE`."""

    kind: str
    value: Any = None
    error: BaseException | None = None
    remote_traceback: TracebackType | None = None


async def run_job(client: Any, job: Job) -> Settled:
    """Submit ``job``, wait for it, fetch its result. Runs on the client's loop.

    The submission happens before the first ``await``, so a coroutine started
    on the loop after this one (a cancellation) finds ``job.future`` set.
    """
    try:
        # A key of its own: every call is a task of its own, run once, even if
        # its arguments repeat (jobs may have side effects).
        job.future = future = client.submit(job.fn, *job.args, key=job.key, pure=False)
    except TypeError as exc:
        if "serialize" not in str(exc):
            raise
        return Settled(UNPICKLABLE, error=exc)
    # Waiting first and gathering a finished future is quicker than gathering a
    # pending one (Client._gather waits through more machinery).
    error = await future.exception(asynchronous=True)
    if future.status == ERROR:
        # The future keeps the worker's traceback untouched.
        return Settled(ERROR, error=error, remote_traceback=await future.traceback(asynchronous=True))
    if future.cancelled():
        # Its FutureCancelledError says why (the scheduler connection was lost...);
        # Future has no public accessor for it short of raising it from gather.
        reason = getattr(getattr(future, "_state", None), "exception", None)
        return Settled(CANCELLED, error=reason if isinstance(reason, BaseException) else None)
    (value,) = await client.gather([future], asynchronous=True)
    return Settled(VALUE, value=value)


async def cancel_job(client: Any, job: Job) -> None:
    """Cancel ``job``'s future. Runs on the client's loop, after `run_job` started."""
    if job.future is not None:
        await client.cancel([job.future], asynchronous=True)


def unwrap(settled: Settled, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """The job's value, or raise what it ended with (in the calling task)."""
    if settled.kind == VALUE:
        return settled.value
    error = settled.error
    if settled.kind == UNPICKLABLE:
        # Dask's own error says only "Could not serialize object of type ...":
        # name the culprit, with the error that pickling it alone raises.
        culprit, culprit_error = find_unpicklable(fn, args)
        shown = culprit_error if culprit_error is not None else error
        assert shown is not None  # run_job's UNPICKLABLE carries Dask's error
        raise unpicklable_job_error(describe(fn), culprit, shown, "the Dask cluster") from error
    if settled.kind == CANCELLED:
        reason = getattr(error, "reason", None) or "no reason given"
        raise BrokenWorkerError(
            f"the Dask cluster dropped the job running {describe(fn)} before it ended "
            f"(reason: {reason}): the client lost its scheduler, or another client "
            "cancelled the job's key.",
            function=describe(fn),
        ) from error
    assert error is not None
    if isinstance(error, KilledWorker):
        raise killed_worker_error(error, fn) from error
    raise with_remote_traceback(error, settled.remote_traceback)


def with_remote_traceback(error: BaseException, remote_tb: TracebackType | None) -> BaseException:
    """Drop the client-side frames from ``error`` and put the worker's
    traceback text at the end of its chain, as the local backend does."""
    text = "Traceback (most recent call last):\n"
    text += "".join(traceback.format_tb(remote_tb)) if remote_tb is not None else "  (no traceback came back)\n"
    text += "".join(traceback.format_exception_only(type(error), error))
    error = error.with_traceback(None)
    link = error
    seen = {id(link)}
    while link.__cause__ is not None and id(link.__cause__) not in seen:
        link = link.__cause__
        seen.add(id(link))
    link.__cause__ = RemoteTraceback(text)
    return error


def killed_worker_error(error: KilledWorker, fn: object) -> BrokenWorkerError:
    worker = error.last_worker
    address = getattr(worker, "address", worker)
    pid = getattr(worker, "pid", None)
    tries = error.allowed_failures + 1
    return BrokenWorkerError(
        f"the Dask worker at {address} (pid {pid}) died while running {describe(fn)}, "
        f"the last of {tries} worker(s) that died running this job (Dask retries a job whose "
        f"worker dies up to distributed.scheduler.allowed-failures={error.allowed_failures} "
        "times). The worker's log, or its nanny's, says why: a crash, os._exit, or the "
        "nanny's memory limit.",
        pid=pid if isinstance(pid, int) else None,
        function=describe(fn),
    )
