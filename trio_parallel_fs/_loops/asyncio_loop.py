"""The primitives under asyncio (see the package's docstring).

Theory of operation
-------------------
asyncio has no cancel scopes: ``task.cancel()`` throws one CancelledError
into whatever the task awaits, shield or not (anyio's shielded scopes do not
stop it either). Trio's contract needs two kinds of scope, so this module
keeps its own, per task, in a context variable (each task runs in its own
copy of the context): a *shield*, which holds off cancellation from outside
it, and a *deadline* (``move_on_after``). They work because every await the
library makes inside them is one of the waits below, which all go through
`_park`:

* The event (fd ready, thread done, timer) wakes a `_Waiter`: it notes why,
  and completes the future the task awaits. A timer for the nearest deadline
  in force (the innermost scopes' deadlines, up to and including the
  innermost shield) wakes it too.
* A CancelledError that arrives inside a shield cancels that future only: it
  is noted on the shield, and the wait goes on, on a fresh future of the same
  waiter, whose event stays armed (an event that came meanwhile is noted on
  the waiter: none is lost). When
  the shield is left without an exception, it raises CancelledError then:
  the job ran to its end, and the cancellation takes effect as the call
  returns, as asyncio's rules want it to (wait_for, asyncio.timeout and
  TaskGroup all need to see it). We never call ``uncancel``: the count is the
  canceller's.
* A deadline that passes raises `_DeadlineExpired`, which its scope catches
  (``cancelled_caught``).

Readiness waits use ``loop.add_reader``/``add_writer``: no thread per call.
A loop without them (Windows' proactor) falls back to anyio's waits, which
carry a selector thread of their own.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel

from . import says_gone

name = "asyncio"

CapacityLimiter = anyio.CapacityLimiter
WouldBlock = anyio.WouldBlock
ClosedResourceError = anyio.ClosedResourceError


class _Scope:
    """A shield or a deadline, innermost first through ``parent``."""

    __slots__ = ("parent", "shield", "deadline", "cancelled_caught", "cancel_pending", "_token")

    def __init__(self, shield: bool = False, deadline: float = math.inf) -> None:
        self.shield = shield
        self.deadline = deadline
        self.cancelled_caught = False
        # The CancelledError held off, if any: its message says who cancelled
        # (anyio's scopes know theirs by it), so it is raised again as it came.
        self.cancel_pending: asyncio.CancelledError | None = None
        self.parent: _Scope | None = None

    def __enter__(self) -> _Scope:
        self.parent = _innermost.get()
        self._token = _innermost.set(self)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        _innermost.reset(self._token)
        if isinstance(exc, _DeadlineExpired) and exc.scope is self:
            self.cancelled_caught = True
            return True
        pending = self.cancel_pending
        if pending is not None:
            outer = _enclosing_shield(self.parent)
            if outer is not None:
                outer.cancel_pending = pending  # still held off, by the next shield out
            elif exc is None:
                raise asyncio.CancelledError(*pending.args)
            elif not isinstance(exc, asyncio.CancelledError):
                # The shielded call failed while a cancel was held off: the
                # task was cancelled, so it ends cancelled (asyncio's rule),
                # the call's error as the cause. Dropped, a caller that
                # catches the error would carry on as if never cancelled.
                raise asyncio.CancelledError(*pending.args) from exc
        return False


class _DeadlineExpired(Exception):
    def __init__(self, scope: _Scope) -> None:
        self.scope = scope


#: What a cancelled wait raises, for ``except`` (Trio's is trio.Cancelled for both).
Cancelled = (asyncio.CancelledError, _DeadlineExpired)

_innermost: ContextVar[_Scope | None] = ContextVar("trio_parallel_fs.asyncio_scope", default=None)


def _enclosing_shield(scope: _Scope | None) -> _Scope | None:
    while scope is not None:
        if scope.shield:
            return scope
        scope = scope.parent
    return None


def CancelScope(*, shield: bool) -> _Scope:  # noqa: N802 - stands where trio.CancelScope stands
    return _Scope(shield=shield)


def move_on_after(seconds: float) -> _Scope:
    return _Scope(deadline=asyncio.get_running_loop().time() + seconds)


_WOKEN, _TIMER, _SLEPT = "woken", "timer", "slept"


class _Waiter:
    """What an event wakes: it notes why (the first event only) and completes
    the future its task awaits now. (Not ``asyncio.shield`` around one
    future: its outer future is completed a loop pass after the inner one,
    which cost every shielded wait a pass, the warm call's among them.)"""

    __slots__ = ("future", "why")

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future
        self.why: str | None = None


def _wake(waiter: _Waiter, why: str) -> None:
    if waiter.why is None:
        waiter.why = why
        future = waiter.future
        if not future.done():  # cancelled: its task makes a new one, or is gone
            future.set_result(None)


Arm = Callable[[_Waiter], Callable[[], object]]


async def _park(arm: Arm | None, until: float = math.inf) -> None:
    """Wait until ``arm``'s event wakes the waiter it is given (``arm``
    returns its disarming), or the loop's clock reaches ``until``; by the
    rules of the scopes in force (see the module's docstring)."""
    loop = asyncio.get_running_loop()
    deadline, expiring, shield = until, None, None
    scope = _innermost.get()
    while scope is not None:
        if scope.deadline < deadline:
            deadline, expiring = scope.deadline, scope
        if scope.shield:
            shield = scope
            break
        scope = scope.parent
    if expiring is not None and deadline <= loop.time():
        raise _DeadlineExpired(expiring)
    waiter = _Waiter(loop.create_future())
    disarm = arm(waiter) if arm is not None else None
    timer = loop.call_at(deadline, _wake, waiter, _TIMER) if deadline != math.inf else None
    try:
        try:
            await waiter.future
        except asyncio.CancelledError as cancel:
            if shield is None:
                raise
            shield.cancel_pending = cancel
            # An anyio scope cancels again on every loop pass while it is
            # cancelled: for the rest of this wait, shield us from anyio's
            # scopes too, or the loop spins a CPU until the job ends. (Not
            # before the first cancel: an anyio scope per wait costs every
            # call.) anyio cancels again once this scope is left.
            with anyio.CancelScope(shield=True):
                await _shielded(waiter, shield, loop)
    finally:
        if disarm is not None:
            disarm()
        if timer is not None:
            timer.cancel()
    if waiter.why == _TIMER and expiring is not None:
        raise _DeadlineExpired(expiring)
    # else the event, or the sleep's own end


async def _shielded(waiter: _Waiter, shield: _Scope, loop: asyncio.AbstractEventLoop) -> None:
    """Wait until ``waiter`` is woken, through any number of cancels, keeping the last."""
    while waiter.why is None:
        waiter.future = loop.create_future()
        try:
            await waiter.future
        except asyncio.CancelledError as cancel:
            shield.cancel_pending = cancel


def _fd(obj: Any) -> int:
    return obj if isinstance(obj, int) else int(obj.fileno())


async def wait_readable(obj: Any) -> None:
    await _wait_readable(obj, None)


#: How often a wait of `wait_readable_or_gone` asks whether its peer is gone.
GONE_POLL_SECONDS = 0.25


async def wait_readable_or_gone(obj: Any, gone: Callable[[], bool]) -> None:
    """``wait_readable(obj)``, which also returns once ``gone()`` says the peer
    is gone, even though ``obj`` never becomes readable: a process the peer
    forked may hold the other end open. Asked every GONE_POLL_SECONDS, by one
    timer per loop (`_GoneWatch`)."""
    await _wait_readable(obj, gone)


async def _wait_readable(obj: Any, gone: Callable[[], bool] | None) -> None:
    loop = asyncio.get_running_loop()
    fd = _fd(obj)

    def arm(waiter: _Waiter) -> Callable[[], object]:
        loop.add_reader(fd, _wake, waiter, _WOKEN)
        return lambda: loop.remove_reader(fd)

    try:
        await _park(arm if gone is None else _also_gone(arm, loop, gone))
    except NotImplementedError:  # no add_reader on this loop (Windows' proactor)
        await _through_anyio(anyio.wait_readable, fd, gone)


class _GoneWatch:
    """One loop's waits of `wait_readable_or_gone`, and the timer that asks
    their ``gone`` every GONE_POLL_SECONDS while there are any (as Trio's
    watch task does): a wait costs a dict entry, not a timer of its own
    (call_later, its cancel and closures cost about 3 µs of CPU of a blocked
    wait's 17, on the warm path whenever the caller does not busy-wait). A
    wait is first asked within GONE_POLL_SECONDS of its start, not exactly then."""

    __slots__ = ("waiting", "looking")

    def __init__(self) -> None:
        self.waiting: dict[_Waiter, Callable[[], bool]] = {}
        # Whether a look is due (a flag, not the timer handle: the handle
        # holds its loop, which would then outlive it through _gone_watches).
        self.looking = False

    def watch(self, loop: asyncio.AbstractEventLoop, waiter: _Waiter, gone: Callable[[], bool]) -> Callable[[], object]:
        """Wake ``waiter`` once ``gone()`` says so; returns the unwatching."""
        self.waiting[waiter] = gone
        if not self.looking:
            self.looking = True
            loop.call_later(GONE_POLL_SECONDS, self._look, loop)
        return lambda: self.waiting.pop(waiter, None)

    def _look(self, loop: asyncio.AbstractEventLoop) -> None:
        for waiter, gone in list(self.waiting.items()):
            if says_gone(gone):
                _wake(waiter, _WOKEN)  # its task unwatches it
        if self.waiting:
            loop.call_later(GONE_POLL_SECONDS, self._look, loop)
        else:
            self.looking = False


# Keyed weakly by the loop. A watch refers to its loop only through the
# waiters in progress (their futures'), so a closed loop and its watch go.
_gone_watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _GoneWatch] = weakref.WeakKeyDictionary()


def _gone_watch(loop: asyncio.AbstractEventLoop) -> _GoneWatch:
    watch = _gone_watches.get(loop)
    if watch is None:
        watch = _gone_watches[loop] = _GoneWatch()
    return watch


async def wait_writable(obj: Any) -> None:
    loop = asyncio.get_running_loop()
    fd = _fd(obj)

    def arm(waiter: _Waiter) -> Callable[[], object]:
        loop.add_writer(fd, _wake, waiter, _WOKEN)
        return lambda: loop.remove_writer(fd)

    try:
        await _park(arm)
    except NotImplementedError:
        await _through_anyio(anyio.wait_writable, fd)


async def _through_anyio(
    wait: Callable[[int], Awaitable[None]], fd: int, gone: Callable[[], bool] | None = None
) -> None:
    """anyio's wait, in a task of its own, waited for by our rules; with
    ``gone``, also until ``gone()`` says the peer is gone (`_GoneWatch`), as
    on a loop with ``add_reader``."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(wait(fd))
    arm = _on_done(task)
    try:
        await _park(arm if gone is None else _also_gone(arm, loop, gone))
    finally:
        task.cancel()


def _also_gone(arm: Arm, loop: asyncio.AbstractEventLoop, gone: Callable[[], bool]) -> Arm:
    """``arm``, whose waiter is also woken once ``gone()`` says the peer is gone."""
    watch = _gone_watch(loop)

    def both(waiter: _Waiter) -> Callable[[], object]:
        disarm = arm(waiter)
        unwatch = watch.watch(loop, waiter, gone)

        def disarm_both() -> None:
            disarm()
            unwatch()

        return disarm_both

    return both


def _on_done(awaited: asyncio.Future[Any]) -> Arm:
    def arm(waiter: _Waiter) -> Callable[[], object]:
        def done(_: object) -> None:
            _wake(waiter, _WOKEN)

        awaited.add_done_callback(done)
        return lambda: awaited.remove_done_callback(done)

    return arm


async def checkpoint() -> None:
    """Let other tasks run: one bare yield to the loop (the busy-wait's, so
    no future and no timer). A cancellation that arrives here is held off by
    a shield like any other; deadlines are looked at by the waits only."""
    try:
        await asyncio.sleep(0)
    except asyncio.CancelledError as cancel:
        shield = _enclosing_shield(_innermost.get())
        if shield is None:
            raise
        shield.cancel_pending = cancel


async def checkpoint_if_cancelled() -> None:
    # asyncio's own cancellation is delivered at the next await, not kept as
    # a state to look at; anyio's cancel scopes are, and a cancelled one
    # should start nothing (no yield when none is).
    await anyio.lowlevel.checkpoint_if_cancelled()


async def sleep(seconds: float) -> None:
    loop = asyncio.get_running_loop()
    await _park(None, until=loop.time() + seconds)


async def to_thread_run_sync(fn: Callable[[], Any], *, abandon_on_cancel: bool = False) -> Any:
    """``fn()`` in the loop's default executor. Not abandoned: the wait is
    shielded (the thread cannot be stopped anyway)."""
    done = asyncio.get_running_loop().run_in_executor(None, fn)
    if abandon_on_cancel:
        await _park(_on_done(done))
    else:
        with _Scope(shield=True):
            await _park(_on_done(done))
    return done.result()


_system_tasks: set[asyncio.Task[None]] = set()  # held here: the loop keeps only weak references


def spawn_system_task(async_fn: Callable[[], Awaitable[None]], *, name: str) -> None:
    task: asyncio.Task[None] = asyncio.get_running_loop().create_task(async_fn(), name=name)  # type: ignore[arg-type]
    _system_tasks.add(task)
    task.add_done_callback(_system_tasks.discard)


def is_limiter(limiter: object) -> bool:
    return isinstance(limiter, anyio.CapacityLimiter)


_limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter] = weakref.WeakKeyDictionary()


def default_limiter(total_tokens: Callable[[], int]) -> anyio.CapacityLimiter:
    """This event loop's default limiter (an `anyio.CapacityLimiter`), made on first use."""
    loop = asyncio.get_running_loop()
    limiter = _limiters.get(loop)
    if limiter is None:
        limiter = _limiters[loop] = anyio.CapacityLimiter(total_tokens())
    return limiter


def foreign_limiter(limiter: object) -> str | None:
    """Why ``limiter`` cannot serve under asyncio, or None."""
    if type(limiter).__module__.split(".")[0] == "trio":
        return (
            "a Trio object works only inside trio.run; under asyncio use an "
            "anyio.CapacityLimiter or an asyncio.Semaphore"
        )
    return None


def current_time() -> float:
    return asyncio.get_running_loop().time()


def open_nursery() -> Any:
    """A task group with Trio's nursery's ``start_soon`` and ``cancel_scope``: anyio's."""
    return anyio.create_task_group()


def cancellable_scope() -> anyio.CancelScope:
    """A scope that ``cancel()`` cancels, for the tasks of `open_nursery`:
    anyio's, as the task group's own. Its cancellation is a ``task.cancel()``,
    so a shield of ours inside it holds it off like any other (and raises it
    again, with anyio's message, when the shield is left: the scope then
    catches it as its own)."""
    return anyio.CancelScope()


class ParkingLot:
    """``trio.lowlevel.ParkingLot``'s ``park`` and ``unpark_all``: tasks wait
    until another wakes them all, by our rules (see the module's docstring)."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: set[_Waiter] = set()

    async def park(self) -> None:
        await _park(self._arm)

    def _arm(self, waiter: _Waiter) -> Callable[[], object]:
        self._waiters.add(waiter)
        return lambda: self._waiters.discard(waiter)

    def unpark_all(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            _wake(waiter, _WOKEN)


class Semaphore:
    """``trio.Semaphore``'s ``acquire`` and ``release`` (no maximum), for a
    waiter or two: a release wakes every waiter and one takes the token. No
    token is handed to a waiter that a cancellation then ends, so none is lost."""

    __slots__ = ("value", "_lot")

    def __init__(self, initial_value: int) -> None:
        self.value = initial_value
        self._lot = ParkingLot()

    async def acquire(self) -> None:
        while self.value == 0:  # noqa: ASYNC110 - woken by release
            await self._lot.park()
        self.value -= 1

    def release(self) -> None:
        self.value += 1
        self._lot.unpark_all()


def current_run() -> object:
    """What identifies this run (objects bound to it work in it only): its loop."""
    return asyncio.get_running_loop()


async def wait_concurrent(future: Any) -> None:
    """Wait until a `concurrent.futures.Future` completes in another thread,
    blocking no thread, by our rules (cancelling the wait leaves it alone)."""
    loop = asyncio.get_running_loop()

    def arm(waiter: _Waiter) -> Callable[[], object]:
        def done(_future: object) -> None:
            try:
                loop.call_soon_threadsafe(_wake, waiter, _WOKEN)
            except RuntimeError:
                pass  # the loop is closed; nobody is waiting any more

        future.add_done_callback(done)
        return lambda: None  # a concurrent future's callbacks cannot be removed; a late one is harmless

    await _park(arm)
