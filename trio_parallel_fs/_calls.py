"""The front end every worker type shares: one call's checks, its limiter and
its cancellation rules, written once.

Theory of operation: every ``run_sync`` (the default context's, a
`WorkerContext`'s, a Dask context's) is `call`. It refuses what cannot run
(keyword arguments for the job, async and generator functions, things that
are not callable, a limiter that is not one), has the worker type prepare the
job (pickling errors raise here, before any wait), takes a limiter token, and
then hands the prepared job to a `Runner`: shielded from cancellation unless
``kill_on_cancel``, in which case the runner stops the job and lets
the cancellation (``trio.Cancelled``, asyncio's CancelledError) through.
A runner may answer that the job never ran (`RESUBMIT`: it goes again,
after a look for cancellation) or that it closed before the job started
(`RunnerClosed`: the call asks for the runner again, since the default
context may have been replaced meanwhile).

What a worker type plugs in is the `Runner`: a local worker context (its pool
of processes) or a Dask context. The event loop library plugs in once for
every worker type: the call looks it up once (`_loops.current`, Trio or
asyncio) and uses its primitives. ``map`` and ``imap`` (``_map``) prepare
chunks of items and run each by these rules, through `_run`.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import cloudpickle

from . import _loops
from ._describe import describe
from ._errors import closed_while_waiting, not_sync_error

T = TypeVar("T")

#: What a `Runner` may return for a job that never ran (its `Runner._resubmit`).
RESUBMIT: Any = object()


class RunnerClosed(Exception):
    """What a `Runner` may raise when it closed before the job started (its
    `Runner._closed_error`)."""


class Runner(Protocol):
    """A worker type's part of a call (see the module's docstring)."""

    #: Names the runner in messages: "worker context", "Dask context".
    _kind: str
    #: What `_run_job` raises when the runner closed before the job started,
    #: and what it returns for a job that never ran. Attributes rather than
    #: fixed names, so that a runner's `_run_job` can be its pool's own
    #: coroutine: one frame less on the warm path, where each costs.
    _closed_error: type[Exception]
    _resubmit: object

    def _default_limiter(self) -> Any:
        """The limiter of a call given none."""

    def _prepare(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """The job, as this runner sends it. May raise `pickle.PicklingError`
        (`unpicklable_job_error`), before the call waits for anything."""

    def _run_job(self, fn: Callable[..., Any], job: Any, kill_on_cancel: bool) -> Awaitable[Any]:
        """Run a prepared job and return its outcome (``.unwrap()`` gives the
        value or raises), or ``_resubmit``; or raise ``_closed_error``.

        Called shielded from cancellation, unless ``kill_on_cancel``: then a
        cancellation stops the job (its worker is killed), is waited for, and
        ``trio.Cancelled`` propagates.
        """


_SYNC_FLAGS_MASK = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR | inspect.CO_GENERATOR


def check_sync(fn: Callable[..., Any]) -> None:
    """Refuse what a worker cannot run: async and generator functions, and
    things that are not callable, each with what to do instead."""
    # The common cases are decided without inspect: a plain function from its
    # code flags, a builtin (never async or a generator) from its type.
    if type(fn) is types.FunctionType and not fn.__code__.co_flags & _SYNC_FLAGS_MASK:
        return
    if type(fn) is types.BuiltinFunctionType:
        return
    if not callable(fn):
        raise TypeError(f"run_sync needs a callable, not {type(fn).__name__} {fn!r}")
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise not_sync_error(describe(fn), "async")
    if inspect.isgeneratorfunction(fn):
        raise not_sync_error(describe(fn), "generator")


def refuse_keywords(fn: Callable[..., Any], keywords: dict[str, Any]) -> TypeError:
    names = ", ".join(f"{name}=" for name in keywords)
    example = ", ".join(f"{name}={name}" for name in keywords)
    return TypeError(
        f"run_sync passes positional arguments only, and got keyword arguments for the job ({names}). "
        f"Bind them first: run_sync(functools.partial({describe(fn)}, {example}), *args)"
    )


def check_limiter(limiter: Any, loop: Any) -> None:
    if not (hasattr(limiter, "__aenter__") and hasattr(limiter, "__aexit__")):
        raise TypeError(
            f"limiter must be a trio.CapacityLimiter, an anyio.CapacityLimiter, an asyncio.Semaphore or "
            f"another async context manager, not {type(limiter).__name__} {limiter!r}"
        )
    reason = loop.foreign_limiter(limiter)
    if reason is not None:
        raise TypeError(f"limiter {limiter!r} cannot serve here: {reason}")


def find_unpicklable(fn: object, args: tuple[Any, ...]) -> tuple[str, BaseException | None]:
    """Which of the function and its arguments will not pickle, and its error."""
    for label, value in [("the function", fn)] + [(f"argument {i}", a) for i, a in enumerate(args)]:
        try:
            cloudpickle.dumps(value)
        except Exception as exc:  # noqa: BLE001 - any failure to pickle names the culprit
            return f"{label} ({type(value).__name__})", exc
    return "the job", None


async def call(
    get_runner: Callable[[], Runner],
    sync_fn: Callable[..., T],
    args: tuple[Any, ...],
    keywords: dict[str, Any],
    kill_on_cancel: bool,
    limiter: Any,
) -> T:
    """The body of every ``run_sync``: check, prepare, take a token, then run
    on the runner ``get_runner`` gives *once the token is held* (the default
    context may have been reconfigured while the call waited for it)."""
    if keywords:
        raise refuse_keywords(sync_fn, keywords)
    check_sync(sync_fn)
    loop = _loops.current()
    runner = get_runner()
    if limiter is None:
        limiter = runner._default_limiter()
    capacity_limiter = loop.is_limiter(limiter)
    if not capacity_limiter:
        check_limiter(limiter, loop)
    job = runner._prepare(sync_fn, args)
    # Entering is a checkpoint, like trio.to_thread.run_sync's: a call in a
    # cancelled scope starts nothing. It yields later, waiting for the reply.
    await loop.checkpoint_if_cancelled()
    if capacity_limiter:
        # ``async with limiter``, minus a trip through the scheduler when a
        # token is free: CapacityLimiter.acquire always yields, which costs a
        # whole event-loop pass on the warm path.
        try:
            limiter.acquire_nowait()
        except loop.WouldBlock:
            await limiter.acquire()
        try:
            return await _run(get_runner, sync_fn, job, kill_on_cancel, loop)
        finally:
            limiter.release()
    async with limiter:
        return await _run(get_runner, sync_fn, job, kill_on_cancel, loop)


async def _run(
    get_runner: Callable[[], Runner], sync_fn: Callable[..., T], job: Any, kill_on_cancel: bool, loop: Any
) -> T:
    while True:
        runner = get_runner()
        try:
            with loop.CancelScope(shield=not kill_on_cancel):
                result = await runner._run_job(sync_fn, job, kill_on_cancel)
        except runner._closed_error:
            if get_runner() is runner:
                raise loop.ClosedResourceError(closed_while_waiting(runner._kind)) from None
            continue  # reconfigured meanwhile: run on the new default context
        if result is not runner._resubmit:
            return result.unwrap()  # type: ignore[no-any-return]
        # The shield hides cancellation; look for it between tries.
        await loop.checkpoint_if_cancelled()


async def wait_for_running_calls(running: Callable[[], int]) -> None:
    """At a context's close: wait, shielded, until ``running()`` is 0.

    Those calls belong to tasks outside the context's block, and cannot be
    killed on their callers' behalf. Polled, not an event: a local context's
    calls may run in other threads' ``trio.run``, which an event of this run
    could not be set from.
    """
    loop = _loops.current()
    with loop.CancelScope(shield=True):
        while running():  # noqa: ASYNC110
            await loop.sleep(0.01)
