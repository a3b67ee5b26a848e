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
the pages of the template's file mappings that it has mapped. It writes that
*plan* where its siblings can read it: a small memfd the template made before
forking any worker. A worker that has been started and then waited a moment
without a job (the successor the parent prepares ahead, when no call is
waiting for it) *applies* the plan: ``madvise``
with ``MADV_POPULATE_WRITE`` / ``MADV_POPULATE_READ`` (Linux 5.14), which
takes the same faults without touching the data, so it is safe on any page.
It stops as soon as a message from the parent is waiting, so a job never
waits for it, and only pages of mappings it still has as the template left
them are touched.

Bounds: only mappings the template had when it was frozen (a job's own
allocations are not copied ahead), at most ``MAX_WRITE_BYTES`` of private
pages per worker (a worker that grew large before it left would otherwise
make every successor large), and a plan is learned again after
``RELEARN_AFTER`` workers used it, so it follows what the jobs do now.
The learning costs the leaving worker about a millisecond, after it has sent
its last reply and lowered its priority.

Linux only (``/proc``, memfd, the two madvise advices); elsewhere, and for
spawned workers (no template), every function here is a no-op. Standard
library only: the worker never imports trio.
"""

from __future__ import annotations

import errno
import functools
import mmap
import os
import re
import struct
import sys
from collections.abc import Callable, Sequence
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
# How many workers apply one plan before a leaving worker learns it again.
RELEARN_AFTER = 16
# Runs (address, length) a plan holds, reads and writes together.
MAX_RUNS = 8192
# Runs applied between two looks for the parent's next message.
_RUNS_PER_LOOK = 32
# A worker applies a plan only after it waited this long (ms) without a
# message: one prepared just before a call would only delay it (a call
# waiting for a worker sends its job right after the settings).
IDLE_FIRST_MS = 2

# The plan's file: magic, version, uses, write runs, read runs; then the runs.
_MAGIC = 0x7470_6670  # "tpfp"
_HEAD = struct.Struct("=IIQII")
_RUN = struct.Struct("=QQ")
_FILE_SIZE = _HEAD.size + MAX_RUNS * _RUN.size

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


class PlanBook:
    """The shared plan of one template's workers: a memfd every worker
    inherits, read and written whole under a POSIX record lock (per process,
    unlike flock, whose locks the inherited descriptions would share)."""

    def __init__(self, fd: int, template_mappings: list[Mapping]) -> None:
        self.fd = fd
        self.template_mappings = template_mappings

    @classmethod
    def create(cls) -> PlanBook | None:
        """In the template, after preloading; None where plans cannot work here."""
        if not supported():
            return None
        try:
            mappings = read_mappings()
            fd = os.memfd_create("tpf-pageplan", os.MFD_CLOEXEC)
        except OSError:
            return None
        try:
            os.ftruncate(fd, _FILE_SIZE)
        except OSError:
            os.close(fd)
            return None
        return cls(fd, mappings)

    def load(self, count_use: bool = False) -> tuple[Plan, int] | None:
        """The plan and how many workers applied it; None if there is none.
        ``count_use``: count this worker as one more that applied it."""
        import fcntl  # POSIX only: this module is imported on Windows too (by every worker)

        fcntl.lockf(self.fd, fcntl.LOCK_EX if count_use else fcntl.LOCK_SH)
        try:
            head = self._head()
            if head is None:
                return None
            uses, writes, reads = head
            body = os.pread(self.fd, (writes + reads) * _RUN.size, _HEAD.size)
            if count_use:
                os.pwrite(self.fd, _HEAD.pack(_MAGIC, 1, uses + 1, writes, reads), 0)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
        runs = list(_RUN.iter_unpack(body[: len(body) // _RUN.size * _RUN.size]))
        return Plan(runs[:writes], runs[writes:]), uses

    def store(self, plan: Plan) -> None:
        writes, reads = plan.writes[:MAX_RUNS], plan.reads[: MAX_RUNS - min(len(plan.writes), MAX_RUNS)]
        body = b"".join(_RUN.pack(*run) for run in (*writes, *reads))
        import fcntl

        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            os.pwrite(self.fd, body, _HEAD.size)
            os.pwrite(self.fd, _HEAD.pack(_MAGIC, 1, 0, len(writes), len(reads)), 0)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def _head(self) -> tuple[int, int, int] | None:
        """The plan's uses and run counts, under the caller's lock; None if
        there is no plan yet (or the file is not one of ours: never trusted,
        see apply)."""
        magic, _version, uses, writes, reads = _HEAD.unpack(os.pread(self.fd, _HEAD.size, 0))
        if magic != _MAGIC or writes + reads > MAX_RUNS:
            return None
        return uses, writes, reads

    def claim_lesson(self) -> bool:
        """Whether a leaving worker should learn the plan again (none yet, or
        used for a while); if so, marks it learned meanwhile, so that workers
        leaving at the same moment do not learn it too (each lesson is
        milliseconds of CPU). The others keep the old plan (or none) until
        the new one is stored."""
        import fcntl

        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            head = self._head()
            if head is not None and head[0] < RELEARN_AFTER:
                return False
            _, writes, reads = head or (0, 0, 0)
            os.pwrite(self.fd, _HEAD.pack(_MAGIC, 1, 0, writes, reads), 0)
            return True
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def learn(self) -> Plan:
        """What this process has copied and mapped of the template's mappings."""
        # By kind of mapping: True for writable private ones (pages copied),
        # False for file mappings (pages mapped).
        runs: dict[bool, list[Run]] = {True: [], False: []}
        budget = {True: MAX_WRITE_BYTES, False: MAX_READ_BYTES}
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            for mapping in self.template_mappings:
                kind = mapping.writable_private
                size = mapping.end - mapping.start
                if size > _MAX_SCANNED_MAPPING or budget[kind] <= 0:
                    continue
                entries = os.pread(pagemap.fileno(), size // PAGE * 8, mapping.start // PAGE * 8)
                flags = entries[_TOP_BYTE::8].translate(_PRIVATE_PAGE if kind else _MAPPED_PAGE)
                for match in _RUN_OF_ONES.finditer(flags):
                    length = min((match.end() - match.start()) * PAGE, budget[kind])
                    if length <= 0:
                        break
                    budget[kind] -= length
                    runs[kind].append((mapping.start + match.start() * PAGE, length))
        return Plan(runs[True], runs[False])

    def apply(self, plan: Plan, should_stop: Callable[[], bool]) -> int:
        """Take the plan's faults here, for the runs that lie within a mapping
        of the same kind this process has now (a run of private pages never
        lands in a shared mapping); stop early when ``should_stop()``.
        Returns the bytes of the runs applied."""
        madvise = _madvise()
        current = read_mappings()
        done = 0
        steps = [(run, MADV_POPULATE_WRITE) for run in _within(plan.writes, current, writable=True)]
        steps += [(run, MADV_POPULATE_READ) for run in _within(plan.reads, current, writable=False)]
        for index, ((address, length), advice) in enumerate(steps):
            if index % _RUNS_PER_LOOK == 0 and should_stop():
                break
            # A run the process no longer has whole fails (ENOMEM, EFAULT):
            # nothing to do about it, the job takes those faults itself.
            if madvise(address, length, advice) == 0:
                done += length
        return done


def _within(runs: Sequence[Run], mappings: list[Mapping], *, writable: bool) -> list[Run]:
    """The runs that lie whole inside one of ``mappings`` of the right kind."""
    bounds = sorted((m.start, m.end) for m in mappings if m.writable_private == writable)
    kept = []
    index = 0
    for address, length in sorted(runs):
        while index < len(bounds) and bounds[index][1] <= address:
            index += 1
        if index < len(bounds) and bounds[index][0] <= address and address + length <= bounds[index][1]:
            kept.append((address, length))
    return kept


@functools.cache
def _madvise() -> Callable[[int, int, int], int]:
    import ctypes

    function = ctypes.CDLL(None, use_errno=True).madvise
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


@functools.cache
def supported() -> bool:
    """Whether plans work here: Linux with /proc, memfd, and a kernel that
    knows MADV_POPULATE_WRITE (5.14+), tried on a page of our own."""
    if not sys.platform.startswith("linux") or not hasattr(os, "memfd_create"):
        return False
    try:
        import ctypes

        with open("/proc/self/pagemap", "rb"):
            pass
        page = mmap.mmap(-1, PAGE)
    except (ImportError, OSError):
        return False
    try:
        result = _madvise()(ctypes.addressof(ctypes.c_char.from_buffer(page)), PAGE, MADV_POPULATE_WRITE)
        errno_value = ctypes.get_errno()
    finally:
        page.close()
    return result == 0 or errno_value not in (errno.EINVAL, errno.ENOSYS)


# --- the template's book, inherited by every worker it forks ------------------

_book: PlanBook | None = None


def open_book() -> None:
    """In the template, after preloading, before any fork."""
    global _book
    _book = PlanBook.create()


def prefault_while_idle(input_within: Callable[[float], bool]) -> int:
    """In a worker before its first job: if no message comes for
    ``IDLE_FIRST_MS``, apply the plan until one does. ``input_within(ms)``
    waits that long for a message and says whether one waits. Returns the
    bytes applied (0 without a plan, or where plans do not work)."""
    if _book is None or input_within(IDLE_FIRST_MS):
        return 0
    try:
        found = _book.load(count_use=True)
        if found is None:
            return 0
        return _book.apply(found[0], lambda: input_within(0))
    except OSError:
        return 0


def learn_before_leaving() -> None:
    """In a worker that served jobs and is leaving: record what it faulted
    in, if the plan is missing or has been used for a while."""
    if _book is None:
        return
    try:
        if _book.claim_lesson():
            _book.store(_book.learn())
    except OSError:
        pass
