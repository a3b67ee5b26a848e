"""How much memory a process uses, by one of three metrics.

USS (unique set size) counts only the pages private to the process. A worker
forked from the template shares the template's imported modules copy-on-write:
RSS counts those shared pages in every worker and would make every worker look
as heavy as the template, so USS is the default metric for recycling.
PSS splits each shared page between the processes that map it.

On Linux the kernel sums the figures for us in /proc/<pid>/smaps_rollup, which
costs one read; elsewhere psutil walks the mappings.

Checking a limit is cheaper still: USS <= PSS <= RSS, and RSS is one short read
of /proc/<pid>/statm, so ``exceeds`` only computes USS or PSS for a process
whose RSS is already above the limit.
"""

from __future__ import annotations

import mmap
import os
import sys
import time

METRICS = ("uss", "pss", "rss")

_ROLLUP_FIELDS = {
    "uss": (b"Private_Clean:", b"Private_Dirty:"),
    "pss": (b"Pss:",),
    "rss": (b"Rss:",),
}


def _from_rollup(pid: int | str, metric: str) -> int | None:
    if not _LINUX:
        return None
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            text = f.read()
    except OSError:
        return None
    fields = _ROLLUP_FIELDS[metric]
    total_kb = 0
    for line in text.splitlines():
        if line.startswith(fields):
            total_kb += int(line.split()[1])
    return total_kb * 1024


_PAGE_SIZE = mmap.PAGESIZE
_LINUX = sys.platform.startswith("linux")  # /proc; elsewhere psutil


# A worker checks its own RSS after every job: keep its statm open and pread it
# (the kernel regenerates the text on each read). Keyed by pid, because a
# forked child inherits the fd, which still describes its parent.
_own_statm: tuple[int, int] | None = None


def _rss_from_statm(pid: int | None) -> int | None:
    global _own_statm
    if not _LINUX:
        return None
    try:
        if pid is None:
            me = os.getpid()
            if _own_statm is None or _own_statm[0] != me:
                _own_statm = (me, os.open(f"/proc/{me}/statm", os.O_RDONLY | os.O_CLOEXEC))
            text = os.pread(_own_statm[1], 128, 0)
        else:
            with open(f"/proc/{pid}/statm", "rb") as f:
                text = f.read()
        return int(text.split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


def exceeds(limit: int, metric: str = "uss", pid: int | None = None) -> int | None:
    """The process's memory by ``metric`` if it is above ``limit``, else None."""
    rss = _rss_from_statm(pid)
    if rss is not None and rss <= limit:
        return None  # every metric is at most RSS
    used = memory_usage(metric, pid)
    return used if used > limit else None


class MemoryWatch:
    """Answers "is this worker above ``limit``?" after every job, cheaply.

    RSS (one pread) bounds every metric, so while it is below the limit nothing
    else is read. Above it, USS or PSS costs a walk of the process's pages
    (about 0.6 ms for a worker that shares numpy and scipy), so the figure is
    measured again only when it could have crossed the limit: its last value
    plus the RSS growth since then reaches the limit, or ``recheck_after``
    seconds have passed (copy-on-write turns shared pages private without
    changing RSS; PSS also moves when other processes exit).
    """

    def __init__(self, limit: int, metric: str, recheck_after: float = 1.0) -> None:
        self.limit = limit
        self.metric = metric
        self.recheck_after = recheck_after
        self._last: tuple[int, int, float] | None = None  # (figure, rss then, when)

    def exceeded(self, exclude: int = 0) -> bool:
        """True if the worker uses more than the limit, not counting ``exclude``
        bytes (what its shared memory area adds to the figure: see
        ``SharedArea.counted_bytes``)."""
        rss = _rss_from_statm(None)
        if rss is None:
            return memory_usage(self.metric) - exclude > self.limit
        if rss <= self.limit:
            return False
        if self.metric == "rss":
            return rss - exclude > self.limit
        now = time.monotonic()
        if self._last is not None:
            figure, rss_then, when = self._last
            if figure + max(rss - rss_then, 0) <= self.limit and now - when < self.recheck_after:
                return False
        figure = memory_usage(self.metric) - exclude
        self._last = (figure, rss, now)
        return figure > self.limit


def memory_usage(metric: str = "uss", pid: int | None = None) -> int:
    """Bytes used by process ``pid`` (default: this one) according to ``metric``."""
    if metric not in METRICS:
        raise ValueError(f"memory metric must be one of {METRICS}, not {metric!r}")
    figure = _from_rollup("self" if pid is None else pid, metric)
    if figure is not None:
        return figure
    import psutil  # only where /proc is not enough

    process = psutil.Process(pid if pid is not None else os.getpid())
    if metric == "rss":
        return int(process.memory_info().rss)
    info = process.memory_full_info()
    return int(getattr(info, metric))
