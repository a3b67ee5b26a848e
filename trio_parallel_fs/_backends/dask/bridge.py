"""Await coroutines that run on a Dask client's event loop, from Trio or asyncio.

Theory of operation: everything a ``distributed.Client`` does on the network
happens on its asyncio event loop. To wait for something the client does (a
job's result, a reply from the scheduler) a task starts a coroutine on that
loop and waits for it by the library's cancellation rules (``_loops``). Where
the client's loop is depends on the client:

* A synchronous ``Client`` runs its loop in a thread of its own (`LoopBridge`),
  under Trio or asyncio. The coroutine goes there with
  ``asyncio.run_coroutine_threadsafe``, and the task waits for its concurrent
  future (``_loops``' ``wait_concurrent``): under Trio it sleeps on a
  `trio.Event` that the future's done-callback, on the client's loop thread,
  sets through the run's `trio.lowlevel.TrioToken`; under asyncio on a future
  of its own loop, woken with ``call_soon_threadsafe``. The two loops meet at
  two thread-safe queue operations per call: one to start the coroutine, one
  to wake the waiting task. No asyncio runs inside Trio (the trio-asyncio route).
* An asynchronous ``Client`` (``asynchronous=True``) runs on the asyncio loop
  that runs the caller (`SameLoopBridge`): the coroutine becomes a task of
  that loop, and the caller parks until the task is done. No thread at all.

Either way a call blocks no thread while it waits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, Protocol, TypeVar

from ... import _loops

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Pending(Protocol[T_co]):
    """A coroutine started on the client's loop, awaitable from one task."""

    async def wait(self) -> T_co:
        """The coroutine's return value, or its exception raised here.

        Cancellable; the coroutine keeps running unless `cancel` is called.
        """

    def cancel(self) -> None:
        """Cancel the coroutine on the client's loop (does not wait)."""


class _Bridge:
    def start(self, async_fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> Pending[T]:
        raise NotImplementedError

    async def call_client(self, method: Callable[[], Any]) -> Any:
        """``method()``, a Client method: one that blocks its caller on a
        synchronous client, and returns a coroutine on an asynchronous one.
        Run to its end: not cancellable."""
        raise NotImplementedError

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


class _InThread(Generic[T]):
    def __init__(self, future: concurrent.futures.Future[T]) -> None:
        self._future = future

    async def wait(self) -> T:
        await _loops.current().wait_concurrent(self._future)
        return self._future.result()

    def cancel(self) -> None:
        self._future.cancel()  # thread-safe


class LoopBridge(_Bridge):
    """Starts coroutines on the event loop of a synchronous Client, in its thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def start(self, async_fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> Pending[T]:
        """Run ``async_fn(*args)`` on the client's loop; return a handle to await it."""
        return _InThread(asyncio.run_coroutine_threadsafe(async_fn(*args), self._loop))

    async def call_client(self, method: Callable[[], Any]) -> Any:
        return await _loops.to_thread_run_sync(method)


class _Task(Generic[T]):
    def __init__(self, task: asyncio.Task[T]) -> None:
        self._task = task

    async def wait(self) -> T:
        # Parked by the library's rules (its shields and deadlines), not by
        # awaiting the task: asyncio would cancel the task with its waiter.
        lot = _loops.current().ParkingLot()
        self._task.add_done_callback(lambda _: lot.unpark_all())
        while not self._task.done():
            await lot.park()
        return self._task.result()

    def cancel(self) -> None:
        self._task.cancel()


class SameLoopBridge(_Bridge):
    """Starts coroutines as tasks of the running asyncio loop, an asynchronous Client's."""

    def __init__(self) -> None:
        # The loop keeps only weak references to its tasks: a job whose caller
        # stopped waiting (a kill_on_cancel) must still run to its end.
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self, async_fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> Pending[T]:
        """Run ``async_fn(*args)`` in a new task (it starts at the loop's next
        pass, after the tasks started before it); return a handle to await it."""
        task = asyncio.get_running_loop().create_task(async_fn(*args))
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return _Task(task)

    async def call_client(self, method: Callable[[], Any]) -> Any:
        # In a task of its own, waited for shielded: awaited here, asyncio
        # would throw a cancellation into Dask's coroutine halfway (a plugin
        # registered but not known to us, a close half done).
        with _loops.CancelScope(shield=True):
            return await self.start(awaited, method()).wait()

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            # Seen as retrieved: its waiter (if any) raises it; a task nobody
            # waits for any more is as a thread's concurrent future, silent.
            task.exception()


async def awaited(awaitable: Awaitable[T]) -> T:
    """A coroutine function for any awaitable (a Client is one), as `start` takes."""
    return await awaitable


def bridge_for(client: Any) -> LoopBridge | SameLoopBridge:
    """The bridge to ``client``'s loop: the running asyncio loop, for an
    asynchronous client made on it; else its own thread's."""
    if runs_here(client):
        return SameLoopBridge()
    return LoopBridge(client.loop.asyncio_loop)  # client.loop: a tornado IOLoop around it


def runs_here(client: Any) -> bool:
    """Whether ``client`` runs on the asyncio loop that runs this task: an
    asynchronous client made on it. (Under Trio no asyncio loop runs here.)"""
    try:
        return client.loop.asyncio_loop is asyncio.get_running_loop()
    except RuntimeError:
        return False
