"""The exceptions a call raises when its job could not run or its worker
failed, and the messages they carry.

Each message says what happened, the evidence, and a likely cause or fix.
The functions below build them; the modules that raise them pass the facts.
Messages about bad arguments stand beside the check that refuses them: a
configuration's in `_config` (one rule per keyword, which the Dask context
uses too), a call's in `_calls`. Errors of the wire (``ProtocolError``) and of
the shared-memory transport are raised where they are found and reach a
caller only as a broken worker.
"""

from __future__ import annotations

import errno
import os
import signal
from typing import TYPE_CHECKING, Any

from _trio_parallel_fs_worker._settings import PreloadError, TemplateInitError, WorkerSetupError
from _trio_parallel_fs_worker.codec import RemoteTraceback as RemoteTraceback
from _trio_parallel_fs_worker.codec import decode_error

if TYPE_CHECKING:
    from ._backends.seam import ExitInfo


def signal_name(exitcode: int | None) -> str | None:
    """``"SIGKILL"`` and so on for an exit code that says a signal killed the
    process (``-signum``); None otherwise, or for a signal Python has no name for."""
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return None


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "an unknown status"
    if exitcode < 0:
        return f"signal {signal_name(exitcode) or -exitcode}"
    return f"exit code {exitcode}"


class BrokenWorkerError(RuntimeError):
    """A worker died, or could not serve, while running a job.

    Attributes:
        pid: The worker's process id, if it was known.
        exitcode: Its exit code; negative (``-signum``) if a signal killed it;
            None if unknown (for example, the template died before reporting).
        signal_name: ``"SIGKILL"`` and so on when a signal killed it, else None.
        template_died: True if the template process died, taking its workers along.
        function: The qualified name of the function that was running, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        pid: int | None = None,
        exitcode: int | None = None,
        template_died: bool = False,
        function: str | None = None,
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.template_died = template_died
        self.function = function

    @property
    def signal_name(self) -> str | None:
        return signal_name(self.exitcode)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls, args, state):  # type: ignore[no-untyped-def]
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class MemoryCeilingError(BrokenWorkerError):
    """The template killed a worker whose memory crossed ``memory_ceiling`` mid-job.

    Attributes:
        used: Bytes the worker used when it was measured, by ``memory_metric``.
        ceiling: The ceiling it crossed, in bytes.
    """

    def __init__(self, message: str, *, used: int, ceiling: int, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.used = used
        self.ceiling = ceiling


class WorkerHookError(BrokenWorkerError):
    """The context's ``init`` or ``retire`` callable raised in a worker; or,
    with ``hook`` ``"init"``, the worker could not set itself up before its
    init hook (the parent's working directory gone; a spawned worker's
    ``preload`` or ``template_init`` failing: the message says which).

    The worker leaves; the hook's exception is this error's ``__cause__``.

    Attributes:
        hook: ``"init"`` or ``"retire"``.
    """

    def __init__(self, message: str, *, hook: str, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.hook = hook


class TemplateStartError(RuntimeError):
    """The template process could not start: a preload failed or started threads.
    Also raised where workers are spawned (no template) and one of them could
    not import the preload or run ``template_init``.

    The error raised in the template (or worker) is this error's ``__cause__``,
    with its remote traceback.
    """



# --- messages ---------------------------------------------------------------------

_HINTS = {
    "SIGKILL": "killed from outside, or by the kernel's OOM killer (see dmesg)",
    "SIGSEGV": "a crash in native code",
    "SIGBUS": "a crash in native code",
    "SIGABRT": "an abort() in native code",
    "SIGTERM": "terminated from outside, e.g. by systemd stopping a unit with KillMode=control-group",
}


def broken_worker_error(
    info: ExitInfo, function: str, metric: str, ceiling: int | None, in_init: bool = False
) -> BrokenWorkerError:
    """The error for a call whose worker died (or could not be started)."""
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
            "Too many processes or open files, or too little memory?",
            **fields,
        )
    if info.unresponsive is not None:
        return BrokenWorkerError(
            f"the template process did not answer within {info.unresponsive:g} s while {function} "
            "needed a worker (was it stopped with SIGSTOP, or is the machine thrashing?); it was "
            "killed with its workers, and the next call starts a new template.",
            **fields,
        )
    if info.template_died:
        return BrokenWorkerError(
            f"the template process died while {who} was running {function}, and took "
            "its workers with it. The next call starts a new template.",
            **fields,
        )
    if info.channel_closed:
        return BrokenWorkerError(
            f"{who} closed its channel to this process while running {function}, and went on "
            "running, so it was killed. Did the job close file descriptors it did not open "
            "(os.closerange, os.dup2 over them)?",
            **fields,
        )
    hint = _HINTS.get(signal_name(info.exitcode) or "", "")
    doing = f"running its init hook, before {function}" if in_init else f"running {function}"
    return BrokenWorkerError(
        f"{who} died with {describe_exit(info.exitcode)} while {doing}" + (f" ({hint})" if hint else "") + ".",
        **fields,
    )


def hook_error(hook: str, cause: BaseException, pid: int | None, function: str) -> WorkerHookError:
    """The error for a call whose worker's ``init`` or ``retire`` hook raised
    ``cause`` (decoded from its event's payload), which becomes its cause."""
    consequence = (
        f"{function} did not run"
        if hook == "init"
        else f"after running {function}; the job's result is lost and the worker left"
    )
    if isinstance(cause, WorkerSetupError):  # before any hook ran
        what = f"the worker could not start: {cause}"
    else:
        what = f"the worker's {hook} hook raised {type(cause).__name__}: {cause}"
    error = WorkerHookError(
        f"{what}; {consequence}",
        hook=hook,
        pid=pid,
        function=function,
    )
    error.__cause__ = cause
    return error


def init_failed_error(payload: bytes, pid: int | None, function: str, preload: tuple[str, ...]) -> Exception:
    """The error for a call whose worker could not start (its InitFailed
    ``payload``): `preload_failure`'s, else `WorkerHookError` (its init hook
    raised, or the working directory is gone)."""
    cause = decode_error(payload)
    return preload_failure(cause, pid, preload) or hook_error("init", cause, pid, function)


def preload_failure(cause: BaseException, pid: int | None, preload: tuple[str, ...]) -> TemplateStartError | None:
    """`TemplateStartError` if ``cause``, what stopped a spawned worker's start,
    is its own preload or ``template_init`` raising, as a template's would
    have; else None."""
    if isinstance(cause, PreloadError):
        return template_start_error(preload, cause=cause, pid=pid, spawned=True)
    return None


def template_start_error(
    preload: tuple[str, ...],
    *,
    cause: BaseException | None = None,
    pid: int | None = None,
    exitcode: int | None = None,
    spawned: bool = False,
    ceiling_used: int | None = None,
    metric: str = "uss",
) -> TemplateStartError:
    """``cause``: what it raised (a `PreloadError` stands for its own cause,
    the original error). ``spawned``: a spawned worker (pid ``pid``) failed to
    preload, where there is no template; its error is the same kind, the
    words say who. ``ceiling_used``: it was killed at the memory ceiling,
    having used that much (by ``metric``)."""
    who = f"a worker (pid {pid})" if spawned else "the template"
    if cause is not None:
        original = cause.__cause__ if isinstance(cause, PreloadError) and cause.__cause__ is not None else cause
        said = f"{type(original).__name__}: {original}"
        if isinstance(cause, TemplateInitError):
            error = TemplateStartError(f"{who} could not run template_init: {said}")
        else:
            error = TemplateStartError(f"{who} could not preload {list(preload)}: {said}")
        error.__cause__ = original
        return error
    process = who if spawned else f"the template process (pid {pid})"
    if ceiling_used is not None:
        return TemplateStartError(
            f"{process} was killed at the memory ceiling while preloading {list(preload)}: it used "
            f"{ceiling_used / 2**20:.1f} MiB ({metric.upper()}). Raise memory_ceiling above what the preload needs."
        )
    return TemplateStartError(
        f"{process} exited with {describe_exit(exitcode)} while preloading {list(preload)}; see its output above"
    )


def stuck_at_close_error(pids: list[int | None], grace_period: float) -> BrokenWorkerError:
    listed = ", ".join(str(pid) for pid in pids)
    return BrokenWorkerError(
        f"{len(pids)} worker(s) (pid {listed}) did not exit within grace_period={grace_period}s "
        "after their context closed, and were killed. A job still running at exit, or an "
        "init/retire hook that blocks? Raise grace_period to give them longer."
    )


def unpicklable_result_error(function: str, exc: BaseException) -> TypeError:
    error = TypeError(
        f"the result of {function} could not be unpickled in the parent: {type(exc).__name__}: {exc}"
    )
    error.__cause__ = exc
    return error


def unpicklable_job_error(function: str, culprit: str, exc: BaseException, where: str = "a worker") -> Exception:
    """``culprit``: which part would not pickle (`_calls.find_unpicklable`);
    ``exc``: its error; ``where``: where it was to go."""
    import pickle

    return pickle.PicklingError(
        f"cannot send {function} to {where}: {culprit} could not be pickled ({type(exc).__name__}: {exc})"
    )


def not_sync_error(function: str, kind: str) -> TypeError:
    if kind == "generator":
        return TypeError(
            f"{function} is a generator function; its generator cannot leave the "
            "worker. Pass a function that returns a list (or another picklable value)."
        )
    return TypeError(
        f"{function} is an async function; run_sync runs synchronous functions "
        "in worker processes. Await it directly, or pass a sync function that runs it."
    )


def baseline_above_max_memory_message(pid: int | None, used: int, limit: int, metric: str) -> str:
    return (
        f"max_memory={limit / 2**20:.1f} MiB is below what a fresh worker of this context uses "
        f"before any job: worker {pid} measured {used / 2**20:.1f} MiB ({metric.upper()}), so every "
        "worker retires after every job. Raise max_memory above that baseline. (Warned once per context.)"
    )


def context_closed(kind: str) -> str:
    """``kind``: "worker context", "Dask context"."""
    return f"this {kind} is closed"


def closed_while_waiting(kind: str) -> str:
    return f"this {kind} closed while the call waited"


PREPARE_FAILED = "trio_parallel_fs could not prepare a worker ahead of demand (the next call starts one itself)"
