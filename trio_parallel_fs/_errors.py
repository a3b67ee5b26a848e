"""Exceptions raised to callers when a worker, its hooks or the template fail."""

from __future__ import annotations

import signal


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
    """The context's ``init`` or ``retire`` callable raised in a worker.

    The worker leaves; the hook's exception is this error's ``__cause__``.

    Attributes:
        hook: ``"init"`` or ``"retire"``.
    """

    def __init__(self, message: str, *, hook: str, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.hook = hook


class TemplateStartError(RuntimeError):
    """The template process could not start: a preload failed or started threads.

    The error raised in the template is this error's ``__cause__``, with its
    remote traceback.
    """


class RemoteTraceback(Exception):
    """Carries the traceback text of an exception raised in a worker.

    Set as the ``__cause__`` of the innermost exception of the chain a job
    raised, so that the worker's frames show up first when the exception is
    printed in the parent.

    Attributes:
        text: The traceback, formatted in the worker.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n\n" + self.text.rstrip("\n")
