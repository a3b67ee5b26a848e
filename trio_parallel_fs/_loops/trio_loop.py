"""The primitives under Trio: Trio's own calls (see the package's docstring)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from . import says_gone

name = "trio"

checkpoint = trio.lowlevel.checkpoint
checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
wait_readable = trio.lowlevel.wait_readable
wait_writable = trio.lowlevel.wait_writable
sleep = trio.sleep
move_on_after = trio.move_on_after
CancelScope = trio.CancelScope
CapacityLimiter = trio.CapacityLimiter
WouldBlock = trio.WouldBlock
ClosedResourceError = trio.ClosedResourceError
Cancelled = trio.Cancelled
enable_ki_protection = trio.lowlevel.enable_ki_protection


def to_thread_run_sync(fn: Callable[[], Any], *, abandon_on_cancel: bool = False) -> Awaitable[Any]:
    return trio.to_thread.run_sync(fn, abandon_on_cancel=abandon_on_cancel)


def spawn_system_task(async_fn: Callable[[], Awaitable[None]], *, name: str) -> None:
    trio.lowlevel.spawn_system_task(async_fn, name=name)


def is_limiter(limiter: object) -> bool:
    """True for the limiter `_calls.call` takes a token from without a trip
    through the scheduler."""
    return type(limiter) is trio.CapacityLimiter


_limiter_runvar: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("trio_parallel_fs.limiter")


def default_limiter(total_tokens: Callable[[], int]) -> trio.CapacityLimiter:
    """This ``trio.run``'s default limiter, made on first use."""
    try:
        return _limiter_runvar.get()
    except LookupError:
        limiter = trio.CapacityLimiter(total_tokens())
        _limiter_runvar.set(limiter)
        return limiter


def foreign_limiter(limiter: object) -> str | None:
    """Why ``limiter`` cannot serve under Trio, or None."""
    return None  # an asyncio.Semaphore or anyio's limiter fails on first use, saying so


current_time = trio.current_time
open_nursery = trio.open_nursery
#: A scope that ``cancel()`` cancels, for the tasks of `open_nursery`.
cancellable_scope = trio.CancelScope
Semaphore = trio.Semaphore
ParkingLot = trio.lowlevel.ParkingLot


def current_run() -> object:
    """What identifies this run (objects bound to it work in it only): its token."""
    return trio.lowlevel.current_trio_token()


async def wait_concurrent(future: Any) -> None:
    """Wait until a `concurrent.futures.Future` completes in another thread,
    blocking no thread: its done-callback wakes us through the run's token."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_future: object) -> None:
        # On the completing thread, or at once here if it had completed.
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass  # the run ended; nobody is waiting any more

    future.add_done_callback(wake)
    await done.wait()


#: How often a wait of `wait_readable_or_gone` asks whether its peer is gone.
GONE_POLL_SECONDS = 0.25


class _GoneWatch:
    """This run's waits of `wait_readable_or_gone`, and the system task that
    wakes those whose peer is gone."""

    def __init__(self) -> None:
        self.waiting: dict[Any, Callable[[], bool]] = {}
        self.wake = trio.Event()

    async def run(self) -> None:
        while True:
            if not self.waiting:
                self.wake = trio.Event()
                await self.wake.wait()
                continue
            await trio.sleep(GONE_POLL_SECONDS)
            for obj, gone in list(self.waiting.items()):
                if says_gone(gone):
                    trio.lowlevel.notify_closing(obj)  # its wait raises ClosedResourceError


_gone_watch: trio.lowlevel.RunVar[_GoneWatch] = trio.lowlevel.RunVar("trio_parallel_fs.gone_watch")


async def wait_readable_or_gone(obj: Any, gone: Callable[[], bool]) -> None:
    """``wait_readable(obj)``, which also returns once ``gone()`` says the peer
    is gone, even though ``obj`` never becomes readable: a process the peer
    forked may hold the other end open. Asked every GONE_POLL_SECONDS, by one
    task per run, so that the wait itself costs a dict entry, not a timer."""
    try:
        watch = _gone_watch.get()
    except LookupError:
        watch = _GoneWatch()
        trio.lowlevel.spawn_system_task(watch.run, name="trio_parallel_fs: gone-peer watch")
        _gone_watch.set(watch)  # once it runs: a run that refuses new tasks leaves it unset
    watch.waiting[obj] = gone
    watch.wake.set()
    try:
        await trio.lowlevel.wait_readable(obj)
    except trio.ClosedResourceError:
        if not gone():
            raise
    finally:
        watch.waiting.pop(obj, None)
