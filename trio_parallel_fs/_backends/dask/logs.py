"""Quiet Dask's log records in this process about our own jobs, while a Dask
context is open.

Theory of operation: with a ``LocalCluster`` the scheduler and the nannies run
in this process, and when a job of ours kills its worker (a crash, or
``kill_on_cancel``) they log about it on our stderr, although the caller hears
of it anyway (`BrokenWorkerError`, or ``trio.Cancelled``). A `logging.Filter`
on their two loggers drops those records, and only those:

* the scheduler's ERROR ``Task KEY marked as failed because N workers died
  while trying to run it``, when KEY is one of our jobs' (`is_our_job`);
* the nanny's WARNINGs ``Restarting worker (status=...)`` and ``Worker process
  still alive after 0.4 seconds, killing``. These name no job nor worker, so
  they are dropped only as many times as a restart of ours was announced
  (`expect`), each announcement lapsing after `EXPECT_FOR` seconds.

A restart is announced by the context before it kills a worker, and by the
filter itself when it drops the scheduler's record (unless one is announced
already: a line too many shown, rather than someone else's hidden): the nanny logs its restart
only after the scheduler has removed the worker (it waits for the scheduler's
answer to "unregister" first, and the scheduler logs the failure while
removing the worker), so the announcement comes first. Where the nannies run
elsewhere (a real cluster), their records never reach this process, and an
announcement lapses unused.

The filter is on while at least one context is open in this process
(`quieted`). At the last close it leaves the loggers, unless an announced
restart has not been logged yet (a worker killed just before the close): it
then stays, dropping nothing but announced records, until those come or
lapse and a later close finds none. Workers' own records about our jobs are
filtered on the workers (``worker.WorkerLogFilter``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .worker import is_our_job

#: Seconds an announced nanny record is waited for before it lapses.
EXPECT_FOR = 60.0

RESTARTING = "Restarting worker"
STILL_ALIVE = "Worker process still alive after"

SCHEDULER_LOGGER = "distributed.scheduler"
NANNY_LOGGER = "distributed.nanny"
_FAILED = "Task %s marked as failed because %d workers died"


class Expected:
    """One announced nanny record (see `DaskLogFilter.expect`)."""

    __slots__ = ("deadline", "kind")

    def __init__(self, kind: str, deadline: float) -> None:
        self.kind = kind
        self.deadline = deadline


class DaskLogFilter(logging.Filter):
    """The filter described in this module's docstring.

    Records arrive in the threads of Dask's event loops, announcements from
    Trio's: one lock guards the announcements.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._expected: list[Expected] = []
        #: Whether a context is open: the scheduler's records are dropped only then.
        self.active = False

    def expect(self, kind: str, count: int = 1) -> list[Expected]:
        """Announce ``count`` nanny records of ``kind`` (`RESTARTING` or
        `STILL_ALIVE`) to drop; the handles returned can `withdraw` them."""
        deadline = time.monotonic() + EXPECT_FOR
        made = [Expected(kind, deadline) for _ in range(count)]
        with self._lock:
            self._expected.extend(made)
        return made

    def withdraw(self, expected: list[Expected]) -> None:
        """Take back announcements that did not come true (still pending)."""
        with self._lock:
            self._expected = [e for e in self._expected if all(e is not w for w in expected)]

    def pending(self, kind: str | None = None) -> int:
        """Announcements (of ``kind``, or all) not come true and not lapsed."""
        now = time.monotonic()
        with self._lock:
            self._expected = [e for e in self._expected if e.deadline > now]
            return sum(kind is None or e.kind == kind for e in self._expected)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg
        if not isinstance(message, str):
            return True
        if record.name == SCHEDULER_LOGGER:
            if not (self.active and message.startswith(_FAILED)):
                return True
            args = record.args
            if not (isinstance(args, tuple) and args and is_our_job(args[0])):
                return True
            # The caller gets BrokenWorkerError naming the worker. Its nanny,
            # if it runs here, logs the restart next, unless a restart is
            # announced already: one death fails every job its worker ran in
            # one go, and a worker we kill may have run another of our jobs.
            # Two deaths at once then announce one restart: a line too many
            # is shown, never one of someone else's hidden.
            if not self.pending(RESTARTING):
                self.expect(RESTARTING)
            return False
        if record.name == NANNY_LOGGER:
            for kind in (RESTARTING, STILL_ALIVE):
                if message.startswith(kind):
                    return not self._take(kind)
        return True

    def _take(self, kind: str) -> bool:
        now = time.monotonic()
        with self._lock:
            self._expected = [e for e in self._expected if e.deadline > now]
            for i, expected in enumerate(self._expected):
                if expected.kind == kind:
                    del self._expected[i]
                    return True
        return False


FILTER = DaskLogFilter()
_LOGGERS = (SCHEDULER_LOGGER, NANNY_LOGGER)
_users_lock = threading.Lock()
_users = 0


@contextmanager
def quieted() -> Iterator[DaskLogFilter]:
    """`FILTER` on the scheduler's and nannies' loggers while the block runs
    (blocks of several contexts, in any threads, may overlap)."""
    global _users
    with _users_lock:
        _users += 1
        FILTER.active = True
        for name in _LOGGERS:
            logging.getLogger(name).addFilter(FILTER)  # once: a logger keeps no duplicates
    try:
        yield FILTER
    finally:
        with _users_lock:
            _users -= 1
            if _users == 0:
                FILTER.active = False
                if not FILTER.pending():
                    for name in _LOGGERS:
                        logging.getLogger(name).removeFilter(FILTER)
