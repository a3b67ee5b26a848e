"""Await coroutines that run on a Dask client's event loop, from Trio or asyncio.

Theory of operation: a synchronous ``distributed.Client`` runs its own asyncio
event loop in a thread of its own, and everything it does on the network
happens there. To wait for something the client does (a job's result, a reply
from the scheduler) a task hands a coroutine to that loop with
``asyncio.run_coroutine_threadsafe``, then waits for its concurrent future
(``_loops``' ``wait_concurrent``): under Trio it sleeps on a `trio.Event` that
the future's done-callback, on the client's loop thread, sets through the run's
`trio.lowlevel.TrioToken`; under asyncio on a future of its own loop, woken
with ``call_soon_threadsafe``.

So a call blocks no thread while it waits, and no asyncio runs inside Trio
(the trio-asyncio route). The two loops meet at two thread-safe queue
operations per call: one to start the coroutine, one to wake the waiting task.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

from ... import _loops

T = TypeVar("T")


class Pending(Generic[T]):
    """A coroutine started on the client's loop, awaitable from one task."""

    def __init__(self, future: concurrent.futures.Future[T]) -> None:
        self._future = future

    async def wait(self) -> T:
        """The coroutine's return value, or its exception raised here.

        Cancellable; the coroutine keeps running unless `cancel` is called.
        """
        await _loops.current().wait_concurrent(self._future)
        return self._future.result()

    def cancel(self) -> None:
        """Cancel the coroutine on the client's loop (thread-safe, does not wait)."""
        self._future.cancel()


class LoopBridge:
    """Starts coroutines on a Dask client's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def start(self, async_fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> Pending[T]:
        """Run ``async_fn(*args)`` on the client's loop; return a handle to await it."""
        return Pending(asyncio.run_coroutine_threadsafe(async_fn(*args), self._loop))

    async def run(self, async_fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        """Run ``async_fn(*args)`` on the client's loop and return its result.

        Cancelling the waiting task cancels the coroutine too.
        """
        pending = self.start(async_fn, *args)
        try:
            return await pending.wait()
        except _loops.current().Cancelled:
            pending.cancel()
            raise
