"""Page faults a fresh worker would take on its first job, taken while it idles.

Theory of operation
-------------------
A worker forked from the template shares the template's memory copy-on-write.
Its first job pays, page by page, for every page of the template's memory it
writes to (refcounts of the objects it uses: a copy-on-write fault, a 4 KiB
copy) and for every page of the template's code and read-only data it reads
(fork copies no page-table entries for file mappings: a minor fault, and
another). For a small numpy/scipy job that is ~200 faults: two thirds of its
first run in a new process (measured: 0.95 ms against 0.29 ms without them).

Which pages those are is much the same from one worker to the next: the same
jobs touch the same objects. So a worker that leaves after serving jobs
*learns* them from ``/proc/self/pagemap``: the pages of the template's
writable private mappings that it holds privately now (it copied them), and
the pages of the template's file mappings that it has mapped. That is the
*plan*. A worker that has been started and then waited a moment without a job
(the successor the parent prepares ahead, when no call is waiting for it)
*applies* the plan: ``madvise`` with ``MADV_POPULATE_WRITE`` /
``MADV_POPULATE_READ`` (Linux 5.14), which takes the same faults without
touching the data, so it is safe on any page. It stops as soon as a message
from the parent is waiting, so a job never waits for it.

Isolation
---------
A job is arbitrary code in a worker, so nothing a worker holds may let it
reach another worker's call (issue 22: a plan file every worker could write,
under a lock, let one job truncate it and kill its siblings, name a 512 MiB
run and grow them, or hold the lock and stall them). So:

- **One owner.** The template (:class:`PlanOwner`) alone writes plans. It
  publishes each version in a memfd of its own, written once and then sealed
  (no write, shrink or grow, and no more seals): the file a worker inherits at
  its fork is its plan for life, and no process can change it (a job that
  reopens it through ``/proc/<template>/fd`` gets a sealed file too). The
  template closes the previous version's fd when it publishes the next, so
  only the workers forked before still hold it (until they prefaulted: a
  worker closes its plan's fd before its first job).
- **Workers send, the owner checks.** The owner asks one child at a time to
  learn: it decides *before* the fork (the plan is missing, or
  ``RELEARN_AFTER`` children were forked with it) and hands only that child
  the sending end of a datagram socketpair made for it, so no other worker
  can send a lesson at all. As it leaves, that worker sends its plan as one
  datagram without waiting (``MSG_DONTWAIT``: with nobody reading, the
  lesson is lost, never waited for). The template reads lessons in its loop
  (and when it reaps the learner) without blocking, takes one datagram per
  learner, checks everything (the size, the counts, each run page-aligned
  and inside a mapping of its own of the right kind, the totals within
  ``MAX_WRITE_BYTES`` / ``MAX_READ_BYTES``), and publishes it only if all of
  it holds: anything else is not ours. A learner that leaves without a lesson
  (idle timeout, killed) or whose lesson was dropped is replaced by the next
  fork; one that has not reported after
  ``RELEARN_AFTER`` more forks (stopped, or serving for ever) is given up.
- **Checked where applied.** A worker reads its plan only if its file is
  sealed as the owner seals it, no larger than a plan can be, and well-formed;
  it applies only page-aligned runs lying inside a mapping of the right kind
  that the template had and that it still has, and stops at
  ``MAX_WRITE_BYTES`` / ``MAX_READ_BYTES`` whatever the file says. Any error
  while reading or applying means no prefault: never a dead worker.
- **No locks**: an immutable file needs none, so nothing on a job's path ever
  waits for a peer.

Bounds: only mappings the template had when it was frozen (a job's own
allocations are not copied ahead), at most ``MAX_WRITE_BYTES`` of private
pages per worker (a worker that grew large before it left would otherwise
make every successor large), and a plan is learned again after
``RELEARN_AFTER`` forks used it, so it follows what the jobs do now.
The learning costs the leaving worker about a millisecond, after it has sent
its last reply and lowered its priority.

Linux only (``/proc``, sealed memfds, the two madvise advices); elsewhere,
and for spawned workers (no template), every function here is a no-op, and
this module imports without ``fcntl`` (it is imported by every worker,
spawned ones on Windows too). Standard library only: the worker never
imports trio.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import mmap
import os
import re
import selectors
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

PAGE = mmap.PAGESIZE
# Linux's values; Python names them from 3.13 only.
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23

# At most this much private memory is copied ahead in a worker; the rest of
# a plan's writes is left to the job.
MAX_WRITE_BYTES = 16 << 20
# Read pages cost page-table entries only, no memory; bounded all the same.
MAX_READ_BYTES = 256 << 20
# Mappings larger than this (address space reserved by an allocator, say)
# are not scanned: their pagemap alone would take long to read.
_MAX_SCANNED_MAPPING = 1 << 32
# How many children the template forks with one plan before it asks one to
# learn it again.
RELEARN_AFTER = 16
# Runs (address, length) a plan holds, reads and writes together.
MAX_RUNS = 8192
# Runs applied between two looks for the parent's next message.
_RUNS_PER_LOOK = 32
# A worker applies a plan only after it waited this long (ms) without a
# message: one prepared just before a call would only delay it (a call
# waiting for a worker sends its job right after the settings).
IDLE_FIRST_MS = 2
# Then it waits for a CPU to be idle (see cpu_to_spare): it looks again
# every _BUSY_RETRY_MS, and gives the plan up after _BUSY_GIVE_UP_MS.
_BUSY_RETRY_MS = 5
_BUSY_GIVE_UP_MS = 1000

# A plan's bytes, in a published file and in a lesson alike: magic, version,
# write runs, read runs; then the runs, writes first.
_MAGIC = 0x7470_6670  # "tpfp"
_VERSION = 2
_HEAD = struct.Struct("=IIII")
_RUN = struct.Struct("=QQ")
MAX_PLAN_BYTES = _HEAD.size + MAX_RUNS * _RUN.size
PLAN_FILE_NAME = "tpf-pageplan"

# The byte of a little-endian 64-bit pagemap entry that holds bits 56-63:
# bit 56 "exclusively mapped", bit 63 "present".
_TOP_BYTE = 7 if sys.byteorder == "little" else 0
_PRESENT = 0x80
_EXCLUSIVE = 0x01
# bytes.translate tables: 1 where a page counts, 0 elsewhere.
_PRIVATE_PAGE = bytes(1 if b & (_PRESENT | _EXCLUSIVE) == _PRESENT | _EXCLUSIVE else 0 for b in range(256))
_MAPPED_PAGE = bytes(1 if b & _PRESENT else 0 for b in range(256))
_RUN_OF_ONES = re.compile(b"\x01+")


class Mapping(NamedTuple):
    """One line of /proc/self/maps, as far as a plan cares."""

    start: int
    end: int
    writable_private: bool  # rw-p: a write copies the page; else a readable file mapping


Run = tuple[int, int]  # (address, length), both page-aligned


class Plan(NamedTuple):
    writes: list[Run]
    reads: list[Run]


# One line of /proc/self/maps: start-end perms offset dev inode [path]
_MAPS_LINE = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+ *(.*)$", re.MULTILINE)


def read_mappings() -> list[Mapping]:
    """This process's mappings that a plan may name: writable private ones
    (anonymous or file) and readable private file mappings; not the kernel's
    own ([vvar], [vdso]), nor shared ones (a shared memory area)."""
    with open("/proc/self/maps", "rb") as maps:
        text = maps.read()
    found = []
    for start, end, perms, name in _MAPS_LINE.findall(text):
        if perms[:1] != b"r" or perms[3:4] != b"p" or name.startswith(b"[v"):
            continue
        writable_private = perms[1:2] == b"w"
        if not writable_private and not (name.startswith(b"/") and not name.endswith(b"(deleted)")):
            continue  # read-only anonymous memory: nothing to copy, no file to map
        found.append(Mapping(int(start, 16), int(end, 16), writable_private))
    return found


# --- a plan's bytes, both ways -----------------------------------------------


def encode_plan(plan: Plan) -> bytes:
    """The plan's bytes, cut to MAX_RUNS runs (writes first)."""
    writes = plan.writes[:MAX_RUNS]
    reads = plan.reads[: MAX_RUNS - len(writes)]
    runs = b"".join(_RUN.pack(*run) for run in (*writes, *reads))
    return _HEAD.pack(_MAGIC, _VERSION, len(writes), len(reads)) + runs


def decode_plan(data: bytes) -> Plan | None:
    """The plan in ``data``, or None unless it is one whole and no more: our
    magic and version, at most MAX_RUNS runs, exactly as many bytes as they
    take. Says nothing about the runs themselves (see check_lesson, apply)."""
    if len(data) < _HEAD.size or len(data) > MAX_PLAN_BYTES:
        return None
    magic, version, writes, reads = _HEAD.unpack_from(data)
    if magic != _MAGIC or version != _VERSION or writes + reads > MAX_RUNS:
        return None
    if len(data) != _HEAD.size + (writes + reads) * _RUN.size:
        return None
    runs = list(_RUN.iter_unpack(memoryview(data)[_HEAD.size :]))
    return Plan(runs[:writes], runs[writes:])


def _inside(runs: Iterable[Run], mappings: Sequence[Mapping], *, writable: bool) -> list[Run]:
    """The runs (sorted) that are page-aligned, not empty, and lie whole inside
    one of ``mappings`` of the right kind (a run of private pages never lands
    in a shared mapping, nor a run of file pages in anonymous memory)."""
    bounds = sorted((m.start, m.end) for m in mappings if m.writable_private == writable)
    kept = []
    index = 0
    for address, length in sorted(runs):
        if length <= 0 or address % PAGE or length % PAGE:
            continue
        while index < len(bounds) and bounds[index][1] <= address:
            index += 1
        if index < len(bounds) and bounds[index][0] <= address and address + length <= bounds[index][1]:
            kept.append((address, length))
    return kept


def check_lesson(data: bytes, mappings: Sequence[Mapping]) -> Plan | None:
    """As the template: the plan a learner sent, if every part of it holds
    (see decode_plan; each run inside one of ``mappings``, the template's own,
    of the right kind; the totals within the caps); None otherwise: whatever
    sent it was not our learning code, so none of it is kept."""
    plan = decode_plan(data)
    if plan is None:
        return None
    for runs, writable, cap in ((plan.writes, True, MAX_WRITE_BYTES), (plan.reads, False, MAX_READ_BYTES)):
        if len(_inside(runs, mappings, writable=writable)) != len(runs):
            return None
        if sum(length for _, length in runs) > cap:
            return None
    return plan


def plan_steps(plan: Plan, *mappings: Sequence[Mapping]) -> list[tuple[Run, int]]:
    """As a worker: the madvise calls that apply ``plan``, whatever it says:
    runs inside a mapping of the right kind in each of ``mappings`` (`apply`
    passes the template's, as inherited), at most MAX_RUNS of them, cut at
    MAX_WRITE_BYTES of writes and MAX_READ_BYTES of reads."""
    steps = []
    for runs, writable, budget, advice in (
        (plan.writes, True, MAX_WRITE_BYTES, MADV_POPULATE_WRITE),
        (plan.reads, False, MAX_READ_BYTES, MADV_POPULATE_READ),
    ):
        kept = runs[:MAX_RUNS]
        for found in mappings:
            kept = _inside(kept, found, writable=writable)
        for address, length in kept:
            if budget < PAGE:
                break
            length = min(length, budget)
            budget -= length
            steps.append(((address, length), advice))
    return steps[:MAX_RUNS]


def apply(
    plan: Plan,
    template_mappings: Sequence[Mapping],
    should_stop: Callable[[], bool],
    madvise: Callable[[int, int, int], int] | None = None,
    *,
    remapped: bool = True,
) -> int:
    """Take the plan's faults here (see plan_steps); stop early when
    ``should_stop()``. Returns the bytes of the runs applied.

    The runs are checked against the template's mappings as this process
    inherited them, and, if ``remapped`` (code of the user's, an init hook,
    ran here since the fork and may have mapped something else there, a
    shared file say), against ``/proc/self/maps`` read again too: reading and
    parsing that costs a fresh numpy/scipy worker a millisecond, which a
    worker whose mappings are still the template's does not pay."""
    madvise = madvise or _madvise()
    done = 0
    mappings = (template_mappings, read_mappings()) if remapped else (template_mappings,)
    for index, ((address, length), advice) in enumerate(plan_steps(plan, *mappings)):
        if index % _RUNS_PER_LOOK == 0 and should_stop():
            break
        # A run the process no longer has whole fails (ENOMEM, EFAULT):
        # nothing to do about it, the job takes those faults itself.
        if madvise(address, length, advice) == 0:
            done += length
    return done


def learn(template_mappings: Sequence[Mapping]) -> Plan:
    """What this process has copied and mapped of the template's mappings."""
    # By kind of mapping: True for writable private ones (pages copied),
    # False for file mappings (pages mapped).
    runs: dict[bool, list[Run]] = {True: [], False: []}
    budget = {True: MAX_WRITE_BYTES, False: MAX_READ_BYTES}
    count = 0
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        for mapping in template_mappings:
            kind = mapping.writable_private
            size = mapping.end - mapping.start
            if size > _MAX_SCANNED_MAPPING or budget[kind] <= 0:
                continue
            entries = os.pread(pagemap.fileno(), size // PAGE * 8, mapping.start // PAGE * 8)
            flags = entries[_TOP_BYTE::8].translate(_PRIVATE_PAGE if kind else _MAPPED_PAGE)
            for match in _RUN_OF_ONES.finditer(flags):
                length = min((match.end() - match.start()) * PAGE, budget[kind])
                if length <= 0 or count >= MAX_RUNS:
                    break
                budget[kind] -= length
                count += 1
                runs[kind].append((mapping.start + match.start() * PAGE, length))
    return Plan(runs[True], runs[False])


# --- the template's side --------------------------------------------------------


class PlanOwner:
    """The template's: it publishes plans (a sealed memfd per version), asks
    one child at a time to learn, and checks what the learner sends."""

    def __init__(self, mappings: list[Mapping]) -> None:
        self.mappings = mappings  # the template's, as frozen
        self.plan_fd: int | None = None  # the published plan, inherited by every child
        self.forks_on_plan = 0  # children forked since it was published (or with none)
        self.lessons: socket.socket | None = None  # our end of the learner's socketpair
        self.learner: int | None = None  # its pid, once forked
        self.forks_since_asked = 0
        self.selector: selectors.BaseSelector | None = None

    def watch(self, selector: selectors.BaseSelector) -> None:
        """Have the template's loop wake for lessons (as key data "lesson")."""
        self.selector = selector
        if self.lessons is not None:
            selector.register(self.lessons, selectors.EVENT_READ, "lesson")

    def before_fork(self) -> socket.socket | None:
        """The sending end of a lesson socket if the next child should learn."""
        if self.lessons is not None:
            self.forks_since_asked += 1
            if self.forks_since_asked <= RELEARN_AFTER:
                return None
            self._forget_learner()  # stopped or stuck, or never leaving: ask another
        if self.plan_fd is not None and self.forks_on_plan < RELEARN_AFTER:
            return None
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        except OSError:  # out of fds: no lesson this time
            return None
        ours.setblocking(False)
        try:
            # Room for the largest plan in one datagram where the default is small.
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_PLAN_BYTES + PAGE)
        except OSError:
            pass
        self.lessons, self.learner, self.forks_since_asked = ours, None, 0
        if self.selector is not None:
            self.selector.register(ours, selectors.EVENT_READ, "lesson")
        return theirs

    def forked(self, pid: int | None, lesson: socket.socket | None) -> None:
        """In the template after a fork (``pid`` None: it failed)."""
        if lesson is not None:
            lesson.close()  # the learner's alone: no later child inherits it
            if pid is None:
                self._forget_learner()
            else:
                self.learner = pid
        if pid is not None:
            self.forks_on_plan += 1

    def in_child(self, lesson: socket.socket | None) -> None:
        """In a child right after the fork: keep the plan's fd (and, in the
        learner, the sending end); drop the template's end of the lessons."""
        global _owner, _inherited
        if self.lessons is not None:
            self.lessons.close()  # the child closed the template's selector first
        _owner = None
        _inherited = Inherited(self.plan_fd, lesson, self.mappings)

    def exited(self, pid: int) -> None:
        """The template reaped ``pid``: if it was the learner, take the lesson
        it sent before leaving (if any), then ask the next child."""
        if pid == self.learner:
            self.read_lessons()
            self._forget_learner()

    def read_lessons(self) -> None:
        """Read the learner's lesson, never waiting; publish it if it holds.
        One datagram per learner, whatever it says: a job in the learner that
        sends more costs the template one check (a few ms at most), not one
        per datagram, and the next child is asked instead."""
        if self.lessons is None:
            return
        try:
            data = self.lessons.recv(MAX_PLAN_BYTES + 1, socket.MSG_DONTWAIT)
        except BlockingIOError:  # nothing yet
            return
        except OSError:  # a socket we can no longer read: ask another child
            data = b""
        plan = check_lesson(data, self.mappings)
        if plan is not None:
            self.publish(plan)
        self._forget_learner()

    def publish(self, plan: Plan) -> bool:
        """Make ``plan`` the one children inherit from now on: a fresh memfd,
        written, then sealed. False (the old plan stays) if that fails."""
        import fcntl

        try:
            fd = os.memfd_create(PLAN_FILE_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError:
            return False
        try:
            data = memoryview(encode_plan(plan))
            while data:
                data = data[os.write(fd, data) :]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
        except OSError:
            os.close(fd)
            return False
        old, self.plan_fd, self.forks_on_plan = self.plan_fd, fd, 0
        if old is not None:
            os.close(old)  # the children forked with it hold their own fds
        return True

    def _forget_learner(self) -> None:
        if self.lessons is not None:
            if self.selector is not None:
                self.selector.unregister(self.lessons)
            self.lessons.close()  # a late lesson now fails to send, harmlessly
        self.lessons = self.learner = None


# --- in a worker -------------------------------------------------------------


class Inherited(NamedTuple):
    """What a child keeps of the owner's: the plan of its fork's moment, the
    sending end of a lesson socket if it was asked to learn, the mappings."""

    plan_fd: int | None
    lesson: socket.socket | None
    mappings: list[Mapping]


def read_plan(fd: int) -> Plan | None:
    """The plan in a file the owner published; None unless the file is sealed
    as the owner seals it (so nobody can change it while we read or later)."""
    import fcntl

    if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALS != _SEALS:
        return None
    size = os.fstat(fd).st_size
    if size > MAX_PLAN_BYTES:
        return None
    return decode_plan(os.pread(fd, size, 0))


@functools.cache
def _madvise() -> Callable[[int, int, int], int]:
    import ctypes

    function = ctypes.CDLL(None, use_errno=True).madvise
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


# F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE, Linux's values (fcntl is not
# imported at the top: this module is imported on Windows too).
_SEALS = 0x0002 | 0x0004 | 0x0008


@functools.cache
def supported() -> bool:
    """Whether plans work here: Linux with /proc, sealable memfds, and a
    kernel that knows MADV_POPULATE_WRITE (5.14+), tried on a page of our own."""
    if not sys.platform.startswith("linux") or not hasattr(os, "MFD_ALLOW_SEALING"):
        return False
    try:
        import ctypes
        import fcntl

        fcntl.F_ADD_SEALS  # noqa: B018 - Python built without it: no sealing
        with open("/proc/self/pagemap", "rb"):
            pass
        page = mmap.mmap(-1, PAGE)
    except (ImportError, AttributeError, OSError):
        return False
    try:
        result = _madvise()(ctypes.addressof(ctypes.c_char.from_buffer(page)), PAGE, MADV_POPULATE_WRITE)
        errno_value = ctypes.get_errno()
    finally:
        page.close()
    return result == 0 or errno_value not in (errno.EINVAL, errno.ENOSYS)


# --- the entry points: the template's owner, what each worker inherited -------

_owner: PlanOwner | None = None  # in the template
_inherited: Inherited | None = None  # in a forked worker


def open_book() -> PlanOwner | None:
    """In the template, after preloading, before any fork (and before
    gc.freeze); the owner, or None where plans do not work."""
    global _owner
    if not supported():
        return None
    try:
        _owner = PlanOwner(read_mappings())
    except OSError:
        return None
    return _owner


def apply_plan_while_idle(input_within: Callable[[float], bool], remapped: bool = True, *, spare: bool = False) -> int:
    """In a worker before its first job: if no message comes for
    ``IDLE_FIRST_MS``, apply the plan until one does. ``input_within(ms)``
    waits that long for a message and says whether one waits; ``remapped``:
    whether user code (an init hook) ran since the fork (see `apply`).
    Returns the bytes applied (0 without a plan, or where plans do not work).
    The plan's fd is closed either way: no job sees it.

    In a spare (``spare``), waiting for the channel that makes it a worker
    (``input_within`` looks for that): a spare is forked when a CPU is idle,
    and the worker it becomes in a burst of calls may have no idle moment
    left. A plan the spare did not apply (a channel came first, or every CPU
    stayed busy) is kept for the worker, which may have its moment."""
    global _inherited
    inherited = _inherited
    if inherited is None or inherited.plan_fd is None:
        return 0
    fd = inherited.plan_fd
    applied = 0
    try:
        # Wait for a moment without a message, then for a CPU to be idle:
        # right after a worker is prepared, its predecessor's exit and the
        # template's next fork usually keep the CPUs busy for a few ms.
        wait, waited = IDLE_FIRST_MS, 0.0
        while True:
            if input_within(wait):
                return 0
            if cpu_to_spare():
                break
            waited += wait
            if waited >= _BUSY_GIVE_UP_MS:
                return 0
            wait = _BUSY_RETRY_MS
        # Whatever goes wrong from here (a file that is not what it should
        # be, a mapping gone), the job takes its own faults: nothing else.
        try:
            plan = read_plan(fd)
            if plan is None:
                return 0
            applied = apply(plan, inherited.mappings, lambda: input_within(0), remapped=remapped)
        except Exception:  # noqa: BLE001 - no prefault, never a dead worker
            return 0
        return applied
    finally:
        if applied or not spare:
            _inherited = inherited._replace(plan_fd=None)
            with contextlib.suppress(OSError):  # an init hook may have closed it
                os.close(fd)


def cpu_to_spare(loadavg_path: str = "/proc/loadavg") -> bool:
    """Whether a CPU is idle now, so that work done ahead of demand (applying
    a plan, forking a spare) takes no CPU time from a job. A burst of calls on
    fresh workers keeps every CPU busy: there a worker's plan would take the
    same faults its job takes anyway, at the cost of other workers' forks,
    jobs and exits (measured: 2-3 ms of CPU per worker).

    The fourth field of /proc/loadavg counts the runnable tasks of the whole
    host, this one included, at this instant; it is compared with the host's
    online CPUs, the same scope. Compared with the CPUs this process may use
    (fewer under taskset or a cpuset), it called the machine busy whenever
    the host's other CPUs were, and the plan was mostly not applied; here the
    host's tasks count as spread over all its CPUs, ours among them."""
    try:
        with open(loadavg_path, "rb") as loadavg:
            runnable = int(loadavg.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return True
    return runnable - 1 < (os.cpu_count() or 1)


def learn_before_leaving() -> None:
    """In a worker that served jobs and is leaving: if the template asked it
    to learn, send what it faulted in (one datagram, never waiting)."""
    global _inherited
    inherited = _inherited
    if inherited is None or inherited.lesson is None:
        return
    _inherited = inherited._replace(lesson=None)
    try:
        inherited.lesson.send(encode_plan(learn(inherited.mappings)), socket.MSG_DONTWAIT)
    except Exception:  # noqa: BLE001 - queue full, template gone: no lesson, nothing else
        pass
    finally:
        inherited.lesson.close()
