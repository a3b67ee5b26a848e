"""Await coroutines that run on a Dask client's event loop from Trio.

Theory of operation: a synchronous ``distributed.Client`` runs its own asyncio
event loop in a thread of its own, and everything it does on the network
happens there. To wait for something the client does (a job's result, a reply
from the scheduler) a Trio task hands a coroutine to that loop with
``asyncio.run_coroutine_threadsafe``, then sleeps on a `trio.Event`. When the
coroutine ends, its concurrent future's done-callback runs on the client's loop
thread and sets the event through the Trio run's `trio.lowlevel.TrioToken`.

So a call blocks no thread while it waits, and no asyncio runs inside Trio
(the trio-asyncio route). The two loops meet at two thread-safe queue
operations per call: one to start the coroutine, one to wake the Trio task.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

import trio

T = TypeVar("T")


class Pending(Generic[T]):
    """A coroutine started on the client's loop, awaitable from one Trio task."""

    def __init__(self, future: concurrent.futures.Future[T], token: trio.lowlevel.TrioToken) -> None:
        self._future = future
        self._done = trio.Event()
        self._token = token
        future.add_done_callback(self._wake)

    def _wake(self, _future: object) -> None:
        # On the client's loop thread, or at once in this thread if the
        # coroutine had already ended when the callback was added.
        try:
            self._token.run_sync_soon(self._done.set)
        except trio.RunFinishedError:
            pass  # the Trio run ended; nobody is waiting any more

    async def wait(self) -> T:
        """The coroutine's return value, or its exception raised here.

        Cancellable; the coroutine keeps running unless `cancel` is called.
        """
        await self._done.wait()
        return self._future.result()

    def cancel(self) -> None:
        """Cancel the coroutine on the client's loop (thread-safe, does not wait)."""
        self._future.cancel()


class LoopBridge:
    """Starts coroutines on a Dask client's event loop for the current Trio run."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def start(self, async_fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> Pending[T]:
        """Run ``async_fn(*args)`` on the client's loop; return a handle to await it.

        Must be called from inside a Trio run: its token wakes the waiter.
        """
        token = trio.lowlevel.current_trio_token()
        return Pending(asyncio.run_coroutine_threadsafe(async_fn(*args), self._loop), token)

    async def run(self, async_fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """Run ``async_fn(*args)`` on the client's loop and return its result.

        Cancelling the waiting Trio task cancels the coroutine too.
        """
        pending = self.start(async_fn, *args)
        try:
            return await pending.wait()
        except trio.Cancelled:
            pending.cancel()
            raise
