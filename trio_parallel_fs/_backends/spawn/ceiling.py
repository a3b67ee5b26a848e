"""``memory_ceiling`` for spawned workers: the parent watches them and kills one above it.

With the template, the template measures its workers between fork requests.
Spawned workers have no template, so the parent does it, from one daemon
thread, theory of operation:

* The pool registers each spawned worker with `CeilingWatcher.watch` (its pid
  and how to kill it) and unregisters it with `CeilingWatcher.unwatch` once it
  has been reaped. The thread starts with the first registration and ends as
  soon as none remains, so an idle pool holds no thread; `close` ends it too.
* Every ``interval`` seconds it measures each worker with psutil (portable: no
  ``/proc`` of ours). RSS comes first because it is cheap and bounds every
  metric (USS <= PSS <= RSS); only a worker whose RSS is above the ceiling
  costs a USS or PSS measurement.
* A worker above the ceiling gets its figure recorded in `Watched.used`
  *before* it is killed, so whoever reaps it can tell a ceiling kill from any
  other death and raise `MemoryCeilingError` with the figure.
* The kill happens under the watcher's lock, and `unwatch` takes that lock: once
  `unwatch` has returned, the kill callback is never called again. So the pool
  may release the process handle right after, and no recycled pid is ever hit.
* After a fork of the parent, the child forgets every registration (those
  workers are its parent's, not its own) and gets a fresh lock: the watcher
  thread does not exist in the child and may have held the old one.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from collections.abc import Callable

import psutil

METRICS = ("uss", "pss", "rss")  # as in _trio_parallel_fs_worker._memory, which needs `resource`

# Check interval, as the template's (``ceiling_interval``).
INTERVAL = 0.02

# A worker whose RSS is above the ceiling but whose last USS/PSS figure was
# not: measured again once its RSS has grown by the margin left, or after this
# long (copy-on-write and freed pages move USS without moving RSS).
RECHECK_AFTER = 1.0


class Watched:
    """One registered worker.

    Attributes:
        pid: Its process id.
        used: Bytes it used (by the watcher's metric) when the watcher killed it
            for crossing the ceiling; None while it has not been killed.
    """

    __slots__ = ("pid", "used", "_kill", "_process", "_last")

    def __init__(self, pid: int, kill: Callable[[], object]) -> None:
        self.pid = pid
        self.used: int | None = None
        self._kill = kill
        try:
            self._process: psutil.Process | None = psutil.Process(pid)
        except psutil.Error:  # it has already exited: nothing to watch
            self._process = None
        self._last: tuple[int, int, float] | None = None  # (figure, rss then, when)

    def __repr__(self) -> str:
        return f"<Watched pid={self.pid} used={self.used}>"

    def measure(self, ceiling: int, metric: str) -> int | None:
        """Its memory by ``metric`` if above ``ceiling``; else (or if it is gone) None."""
        if self._process is None:
            return None
        try:
            rss = int(self._process.memory_info().rss)
            if rss <= ceiling:
                return None
            if metric == "rss":
                return rss
            now = time.monotonic()
            if self._last is not None:
                figure, rss_then, when = self._last
                if figure + max(rss - rss_then, 0) <= ceiling and now - when < RECHECK_AFTER:
                    return None
            figure = int(getattr(self._process.memory_full_info(), metric))
        except psutil.Error:  # it exited between two looks
            return None
        self._last = (figure, rss, now)
        return figure if figure > ceiling else None


_watchers: weakref.WeakSet[CeilingWatcher] = weakref.WeakSet()


def _forget_after_fork() -> None:
    for watcher in list(_watchers):
        watcher._after_fork_in_child()


if hasattr(os, "register_at_fork"):  # POSIX; Windows has no fork
    os.register_at_fork(after_in_child=_forget_after_fork)


class CeilingWatcher:
    """Kills registered processes whose memory crosses ``ceiling``.

    Args:
        ceiling: The limit, in bytes (``memory_ceiling``).
        metric: ``"uss"``, ``"pss"`` (Linux only) or ``"rss"`` (``memory_metric``).
        interval: Seconds between two rounds of measurements.

    Raises:
        ValueError: An unknown metric, or PSS where psutil cannot measure it.
    """

    def __init__(self, ceiling: int, metric: str = "uss", interval: float = INTERVAL) -> None:
        if metric not in METRICS:
            raise ValueError(f"memory metric must be one of {METRICS}, not {metric!r}")
        if metric == "pss" and not sys.platform.startswith("linux"):
            raise ValueError(
                f"memory_metric='pss' is measured on Linux only, and this is {sys.platform}; "
                "use 'uss' (private memory) or 'rss'"
            )
        if ceiling <= 0:
            raise ValueError(f"the ceiling must be a positive number of bytes, not {ceiling!r}")
        self.ceiling = ceiling
        self.metric = metric
        self.interval = interval
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._watched: dict[int, Watched] = {}  # by id(): a pid may be registered again
        self._thread: threading.Thread | None = None
        self._closed = False
        _watchers.add(self)

    @property
    def running(self) -> bool:
        """True while the watcher thread is alive."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    @property
    def count(self) -> int:
        """How many processes are registered."""
        return len(self._watched)

    def watch(self, pid: int, kill: Callable[[], object]) -> Watched:
        """Register process ``pid``; ``kill`` ends it (e.g. ``popen.kill``).

        ``kill`` runs on the watcher thread, under the watcher's lock: it must
        be quick and must not call back into the watcher.
        """
        watched = Watched(pid, kill)
        with self._lock:
            if self._closed:
                raise RuntimeError("this memory ceiling watcher is closed; its pool has shut down")
            self._watched[id(watched)] = watched
            if self._thread is None:
                self._wakeup.clear()
                self._thread = threading.Thread(
                    target=self._run, name="trio_parallel_fs memory ceiling", daemon=True
                )
                self._thread.start()
        return watched

    def unwatch(self, watched: Watched) -> None:
        """Stop watching; after this returns, its ``kill`` is never called. Idempotent."""
        with self._lock:
            self._watched.pop(id(watched), None)
            if not self._watched:
                self._wakeup.set()  # let the thread end now, not after a sleep

    def close(self, timeout: float = 5.0) -> None:
        """Forget every worker and end the thread (waiting up to ``timeout`` s)."""
        with self._lock:
            self._closed = True
            self._watched.clear()
            self._wakeup.set()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._watched or self._closed:
                    # Under the lock, so a concurrent watch() either registered
                    # before this check or sees no thread and starts one.
                    self._thread = None
                    return
                watched = [w for w in self._watched.values() if w.used is None]
            for worker in watched:
                used = worker.measure(self.ceiling, self.metric)
                if used is None:
                    continue
                with self._lock:
                    if id(worker) in self._watched and worker.used is None:
                        # The figure first: the reaper reads it to name the cause.
                        worker.used = used
                        try:
                            worker._kill()
                        except Exception:  # noqa: BLE001 - it exited meanwhile; nothing to do
                            pass
            self._wakeup.wait(self.interval)
            with self._lock:
                if self._watched:
                    self._wakeup.clear()

    def _after_fork_in_child(self) -> None:
        # The parent's workers are not ours to kill, the thread does not exist
        # here, and the old lock may have been held by it at the fork.
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._watched = {}
        self._thread = None
