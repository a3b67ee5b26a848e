"""When to busy-wait for a message that usually comes quickly, and for how long.

Theory of operation
-------------------
A process that blocks until the other end's next message pays for being woken
when it comes: on an idle CPU of a virtual machine that alone is tens of
microseconds (the CPU halted, and waking it goes through the hypervisor). A
call pays it twice: the worker wakes for the job, the caller for the reply.
When messages come back quickly (a loop of short jobs), looking for the
message in a loop for a bounded time instead keeps the CPU awake and saves
both wake-ups; when they do not, such a loop only burns CPU.

So each end keeps a running estimate of how long its recent waits took, busy
or blocking, and busy-waits only while that estimate is below the limit, and
never longer than the limit (``WorkerConfig.busy_wait``; 0 turns it off). One
slow job raises the estimate past the limit at once; a few quick waits bring
it back below. Between two looks the loop gives the CPU away, so a process
sharing the CPU (the caller, another worker) may run meanwhile.

Waits longer than the limit are often regular: a loop that calls, does some
work of its own, and calls again. There the worker sleeps through most of
the expected wait (to the microsecond) and busy-waits from shortly before
the job is due, for up to the limit: it is awake when the job comes, for at
most a limit of CPU per call. The caller busy-waits for the reply while
replies come quickly, whether the worker was awake or the job woke it: a
sleeping worker's wake-up is on the reply's path either way, and a blocked
caller would add its own.

A busy-wait that runs out is worse than none. Where another process keeps
the other CPU busy, the woken worker waits for that CPU while the caller
spins on its own, which the scheduler then never sees idle (a CPU about to
idle is where Linux looks for a waiting task to pull over): every call pays
the whole window, then the wake-up. Measured (``bench.warm_interleaved``, a
CPU-bound process on the other CPU): 279 µs a warm call against 70 µs with
``busy_wait=0``. So after a busy-wait that ran out the caller blocks at once
for the next wait, then for twice as many after each further one in a row
(up to ``_BACKOFF_MAX``); one that sees its message in time ends this.

A busy-wait only pays where the two ends run on two CPUs at once. Where this
process may use one CPU only (its affinity mask, or on Linux its cgroup's CPU
quota), the two ends would take turns on it, and a yield does not hand the
CPU over at once (measured: pinned to one CPU, a warm call took 1.4x as long
with busy-waits): there the limit is 0.

Used by both the parent and the worker: standard library only.
"""

from __future__ import annotations

import functools
import os
import select
import socket
import time
from collections.abc import Callable

# sched_yield where the OS has it; sleep(0) gives up the time slice on Windows.
yield_cpu = getattr(os, "sched_yield", None) or (lambda: time.sleep(0))


def input_poller(sock: socket.socket) -> Callable[[float | None], object]:
    """A function that waits up to a timeout (ms; 0: just look; None: forever)
    for input on ``sock``, or for its end, and says (truthy) whether it came.

    Both ends wait through it: a poller asks for input events only, so a
    sleeping worker is not woken when the parent reads its reply (a Unix
    socket announces freed send space on the same wait queue)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return poller.poll  # a list: empty (false) on timeout

    def select_input(timeout: float | None) -> bool:  # Windows
        readable, _, _ = select.select([sock], [], [], None if timeout is None else timeout / 1000)
        return bool(readable)

    return select_input


def sleep_for_input(sock: socket.socket, ns: int) -> bool:
    """Wait up to ``ns`` for input on ``sock`` (to the microsecond: poll()
    counts whole milliseconds); say whether it came."""
    try:
        return bool(select.select([sock], [], [], ns / 1e9)[0])
    except ValueError:  # an fd beyond select's FD_SETSIZE: whole milliseconds then
        return ns >= 1_000_000 and bool(input_poller(sock)(ns // 1_000_000))


# Waits longer than the limit, but regular, up to this many limits: the
# waiting end sleeps through most of the wait and busy-waits around its end.
_REGULAR_MAX = 32


# After busy-waits that ran out, one after another: at most this many waits
# block at once before the caller tries again (see the module's docstring).
_BACKOFF_MAX = 64


class CallerSpin:
    """The caller's busy-wait window on one worker's channel (the parent's
    `PooledWorker.receive`); `WorkerSpin` is the worker's."""

    __slots__ = ("limit_ns", "typical_ns", "window", "skip", "backoff")

    def __init__(self, limit: float) -> None:
        """``limit``: the longest busy-wait, in seconds (0: never)."""
        self.limit_ns = int(limit * 1e9) if limit and busy_waits_pay() else 0
        self.typical_ns = 0  # recent waits, each counted as at most 4 limits
        self.window = 0  # the window given to the wait in progress
        self.skip = 0  # waits left that block at once, after a busy-wait ran out
        self.backoff = 1  # how many the next busy-wait that runs out skips

    def window_ns(self) -> int:
        """How long to busy-wait now: the limit, or 0 while waits run longer
        or after busy-waits that ran out."""
        if self.skip:
            self.skip -= 1
            window = 0
        else:
            window = self.limit_ns if self.typical_ns < self.limit_ns else 0
        self.window = window
        return window

    def waited(self, ns: int) -> None:
        """Record how long a wait took, from its start to the message."""
        window = self.window
        if window:
            self.window = 0
            if ns >= window:  # the busy-wait ran out
                self.skip = self.backoff
                self.backoff = min(2 * self.backoff, _BACKOFF_MAX)
            else:
                self.backoff = 1
        # A running average weighting the newest wait by a quarter; a very long
        # wait counts as four limits, so that one pause does not stop busy
        # waits for long once messages come quickly again.
        self.typical_ns = (3 * self.typical_ns + min(ns, 4 * self.limit_ns)) >> 2


class WorkerSpin(CallerSpin):
    """The worker's busy-wait window (the worker loop's ``Inbox``): the
    caller's rules, plus its plan for waits longer than the limit."""

    __slots__ = ("gap_ns", "spread_ns")

    def __init__(self, limit: float) -> None:
        super().__init__(limit)
        self.gap_ns = 0  # recent waits, each counted as at most twice _REGULAR_MAX limits
        self.spread_ns = 0  # how far recent waits were from gap_ns

    def plan(self) -> tuple[int, int]:
        """``(sleep, busy)`` in ns: how long to wait blocking first, then how
        long to busy-wait, before blocking until the message comes.

        Quick waits: busy at once, for up to the limit. Longer waits that are
        regular (each within a quarter of the limit of the last ones, up to
        ``_REGULAR_MAX`` limits: a loop that calls between two pieces of its
        own work): sleep until half a limit before the message is due, then
        busy-wait for up to a limit, so the wake-up happens before the message
        comes instead of after (as Linux's hybrid polling of fast disks
        sleeps through half the expected time and then polls). Otherwise none.
        """
        limit = self.limit_ns
        if not limit:
            return 0, 0
        if self.typical_ns < limit:
            return 0, limit
        if 4 * self.spread_ns <= limit and self.gap_ns < _REGULAR_MAX * limit:
            return max(0, self.gap_ns - self.spread_ns - limit // 2), limit
        return 0, 0

    def waited(self, ns: int) -> None:
        super().waited(ns)
        ns = min(ns, 2 * _REGULAR_MAX * self.limit_ns)  # past the plan's bound, never just below it
        self.spread_ns = (3 * self.spread_ns + abs(ns - self.gap_ns)) >> 2
        self.gap_ns = (3 * self.gap_ns + ns) >> 2


@functools.cache
def busy_waits_pay() -> bool:
    """Whether this process may use two CPUs at once (asked once per process:
    a fresh worker's channel should not read /proc)."""
    return usable_cpus() >= 2


def usable_cpus() -> float:
    """How many CPUs this process may keep busy at once: its affinity mask,
    bounded by its cgroup's CPU quota (cgroup v2, Linux) where there is one."""
    try:
        cpus: float = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return cpus if quota is None else min(cpus, quota)


def cgroup_cpu_quota(membership: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float | None:
    """The CPUs this process's cgroup (v2) may use by its quota (``cpu.max``,
    the smallest along the path from the process's group up: a container's
    limit may sit above the group it runs in); None without one."""
    try:
        with open(membership) as file:
            path = next(line[3:].strip() for line in file if line.startswith("0::"))
    except (OSError, StopIteration):
        return None  # no cgroup v2
    found: float | None = None
    parts = [part for part in path.split("/") if part]
    for depth in range(len(parts), -1, -1):
        try:
            with open(os.path.join(root, *parts[:depth], "cpu.max")) as file:
                quota, period = file.read().split()
            if quota != "max":
                cpus = int(quota) / int(period)
                found = cpus if found is None else min(found, cpus)
        except (OSError, ValueError):
            continue  # no cpu controller here (the root has none), or unreadable
    return found
