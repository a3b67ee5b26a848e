"""A shared memory area per worker, for large pickle-5 buffers.

Theory of operation
-------------------
Large out-of-band buffers (numpy arrays and the like) need not cross the
worker's socket. The parent creates one ``SharedArea`` per worker and gives
the worker its file descriptor (SCM_RIGHTS or ``pass_fds``). Both ends map it
``MAP_SHARED`` and keep the mapping for the worker's whole life. A message
then carries, instead of the buffers' bytes, a small *descriptor*: the size
the area has reached, and each buffer's offset and length in it.

Why one reused area, pre-touched: a fresh segment per message is no faster
than the socket, because the first touch of every page (a page fault, then
the kernel zeroing the page) costs more than copying the bytes. The area pays
that once, when it grows, and each end maps the pages into its page tables at
once (``MAP_POPULATE``), so that copying into it afterwards runs at memory
speed.

Lifetime of the bytes:

* Parent -> worker (arguments): the parent copies the buffers in with
  ``write``; the worker gets views with ``read`` and unpickles the job straight
  from them, no copy. Those views stay valid while the job runs.
* Worker -> parent (results): the worker writes them (``write``) into its *window*
  (below), or, if they all lie in its arguments already (a job that returns
  its argument or a slice of it), names them where they are
  (``describe_in_place``): no copy. The parent *lends* them to the caller
  (``lend``), straight from the area.
* After the job the worker calls ``release``. If it returns False, the job
  kept a reference to an argument (in a global, say): the parent's next
  ``write`` would change that object's bytes under it, so the caller must stop
  reusing this area (retire the worker, or fall back to the socket).

Results lent from the area: ``lend`` gives the caller views over a ctypes
array on the area's mapping; a weak reference tells the parent when the last
view of it (an array rebuilt on it, or any slice of that) has gone, and until
then its region is *lent*. The mapping, and the memfd's pages, live as long as
the array does, after the area is closed and its worker gone. Nothing may be
written over a lent region, and only the parent knows which regions are, so:

* The parent places each job's arguments in a gap between lent regions: the
  lowest one with room for them and, after them, for as much as the last
  result took; else the top one, up to the cap. The rest of that gap is the
  worker's *window* for results, and the job's descriptor says so.
* The worker writes results in its window and moves the window's start past
  them, because the parent may lend them. Both ends apply that rule, so the
  parent knows the worker's window without being told: it is always free of
  lent regions. A job with no buffers in the area changes nothing, unless the
  window has become too small for a result like the last, or regions it lost
  are free again (``wants_window``): then its small buffers, or none, go
  through the area to carry a new window.
* A result outside the window or the arguments (a worker that broke the
  rule) is copied out (``read_copy``), and the next job sets a new window.

The area grows while the caller keeps results (a loop that holds each
result until the next call returns uses two regions in turn). An area that
no job uses for a while is *trimmed* by the parent (``trim``): on Linux,
MADV_REMOVE gives the pages outside lent regions back to the kernel, for both
ends at once; the next transfer allocates them again.

Growth: the writer grows the area (``ftruncate``, then a new mapping, up to
``cap``) and says the new size in the descriptor; a reader whose mapping is
smaller maps the area again at that size. The file never shrinks (on Linux a
seal forbids it), so a mapping never reaches past the end of the file, which
would be SIGBUS.

When the area cannot grow or be mapped: an address-space limit (``RLIMIT_AS``,
set by an init hook, a job, or the shell) makes ``mmap`` fail with ENOMEM, and
a file-size limit (``RLIMIT_FSIZE``; a memfd is a file to the kernel) makes
``ftruncate`` fail with EFBIG. Neither may fail a call that the socket could
carry. So ``write`` raises OSError and leaves the area as it was, and the
writer sends those buffers over the socket instead; a reader that cannot map
the size the writer announced copies the buffers out of the file with plain
reads instead (``_read_from_file``), after unmapping what it had if nothing
uses it: the same private memory the socket would have cost. Only if that
copy does not fit either does the reader raise `AreaMemoryError`, which says
what was asked for and the limit.

Memory accounting: a page mapped by both processes shows in /proc's smaps as
``Shared_*``, so not in USS; a page only one end has mapped yet (the worker
just grew the area for a result) is ``Private_*`` and counted in that
process's USS. ``private_bytes`` says how much of the area that is, from the
sizes alone, and ``area_memory`` reads the exact figures from smaps.

Views and the garbage collector: CPython before 3.12.7 and 3.13.0
(python/cpython#77894) may crash when the garbage collector breaks a cycle
that holds a memoryview together with an object that exports a buffer from
that memoryview (a ``PickleBuffer`` of it, or a view made through one): it
clears the memoryview first, and the last export then frees what is gone, a
segfault. So this module never makes a view that exports from a memoryview
which could end up as garbage: ``as_raw`` flattens a memoryview by a cast
(which shares its managed buffer) rather than through ``PickleBuffer``; and
the pieces ``read`` roots its views on stay reachable while any view of them
lives, from the area and, once it is closed or collected, from
``_stranded``, so the collector never clears one.

Platforms: Linux uses ``memfd_create`` (anonymous: no name in /dev/shm, gone
with the last process holding it, nothing can leak). Other POSIX systems
(macOS) use ``shm_open`` with a random name, unlinked at once; there the
object can be sized only once, so it is sized to ``cap`` at creation (pages
are still allocated only when touched). Where neither exists, ``create``
raises ``SharedAreaUnsupported`` and callers keep using the socket.

This module is used by both the parent and the worker: standard library only,
and the descriptor record (``protocol.descriptor``), which the protocol
carries and checks and this module interprets.
"""

from __future__ import annotations

import gc
import importlib
import math
import mmap
import os
import pickle
import secrets
import sys
import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from .protocol.descriptor import ALIGN, Descriptor, DescriptorError, decode_descriptor, encode_descriptor

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

_posixshmem: Any
try:
    _posixshmem = importlib.import_module("_posixshmem")  # no type stubs
except ImportError:  # Windows, or a Python built without it
    _posixshmem = None


# Name of the memfd, as /proc/<pid>/maps and smaps show it: "/memfd:tpf-shm (deleted)".
MEMFD_NAME = "tpf-shm"
# Prefix of the random POSIX shared memory names (unlinked at once).
_SHM_PREFIX = "/tpf-"

PAGE = mmap.PAGESIZE
# The area grows by at least half its size and in whole MiB, so that a series
# of slightly larger messages does not remap (and re-populate) every time.
_GROWTH_STEP = 1 << 20

# Copies out of the area from this size on go into a private anonymous mapping
# that asks for transparent huge pages: first-touch faults on 4 KiB pages
# would otherwise cost more than the copy (128 MiB: 60 ms of faults, 15 ms of copy).
_HUGE_COPY_MIN = 4 << 20

# MADV_POPULATE_WRITE (Linux 5.14); Python does not name it before 3.13.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)

# How a new mapping gets its pages into the page tables. Measured on Linux 6.x,
# 128 MiB, pages not yet allocated / already allocated by the other end:
# MAP_POPULATE 75 / 7-12 ms, MADV_POPULATE_WRITE 71 / 22-32 ms, touching one
# byte per page 81 / 10 ms, nothing (faults during the copy) 103 / 15-20 ms.
PREFAULT_METHODS = ("map_populate", "madvise", "touch", "none")
if hasattr(mmap, "MAP_POPULATE"):
    DEFAULT_PREFAULT = "map_populate"
else:
    DEFAULT_PREFAULT = "touch"


class SharedAreaUnsupported(OSError):
    """This platform has no anonymous shared memory that we can pass by fd."""


class AreaMemoryError(MemoryError):
    """The buffers in a shared memory area did not fit in this process's memory,
    neither as a mapping of the area nor as a private copy."""


def aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def layout(lengths: Iterable[int], start: int = 0) -> tuple[tuple[tuple[int, int], ...], int]:
    """Place buffers of these lengths from ``start`` on, each at an aligned offset.

    Returns their ``(offset, length)`` extents and the end of the last one.
    """
    extents = []
    end = start
    for length in lengths:
        offset = aligned(end)
        extents.append((offset, length))
        end = offset + length
    return tuple(extents), end


def as_raw(buffer: Any) -> memoryview:
    """``buffer`` as a flat view of its bytes, without a copy.

    Takes what a pickler's ``buffer_callback`` gives (``pickle.PickleBuffer``)
    or any bytes-like object. Raises BufferError if its memory is not one
    contiguous block (C or Fortran order): such a buffer cannot be sent as it is.

    A memoryview in C order (what picklers give) is flattened by a cast, which
    shares its managed buffer: ``PickleBuffer(view).raw()`` would export from
    the memoryview, which can crash the garbage collector of older CPythons
    (see the module's theory of operation).
    """
    if isinstance(buffer, memoryview) and buffer.c_contiguous:
        if buffer.ndim == 1 and buffer.format == "B":
            return buffer
        if buffer.nbytes == 0:
            return memoryview(b"")  # a cast refuses zeros in the shape
        return buffer.cast("B")
    if not isinstance(buffer, pickle.PickleBuffer):
        buffer = pickle.PickleBuffer(buffer)
    raw: memoryview = buffer.raw()
    return raw


def total_bytes(buffers: Sequence[Any]) -> int:
    """The bytes of ``buffers`` (contiguous or not), to compare with a threshold."""
    return sum(memoryview(buffer).nbytes for buffer in buffers)


def unsupported_reason() -> str | None:
    """None if ``SharedArea.create`` can work here, else why it cannot."""
    if hasattr(os, "memfd_create"):
        return None
    if _posixshmem is not None and fcntl is not None:
        return None
    return f"{sys.platform} has neither memfd_create nor shm_open"


def _create_memfd() -> int:
    flags = os.MFD_CLOEXEC | getattr(os, "MFD_ALLOW_SEALING", 0)
    fd = os.memfd_create(MEMFD_NAME, flags)
    seal = getattr(fcntl, "F_ADD_SEALS", None)
    if seal is not None and flags & getattr(os, "MFD_ALLOW_SEALING", 0):
        # Nobody can shrink the area under a mapping (SIGBUS on the next access).
        fcntl.fcntl(fd, seal, fcntl.F_SEAL_SHRINK)
    return fd


def _create_posix_shm(cap: int) -> int:
    if _posixshmem is None:
        raise SharedAreaUnsupported(f"{sys.platform} has no shm_open in this Python")
    for _ in range(16):
        # POSIX names are global: a random one, 64 bits of it, unlinked the
        # moment it is open. macOS allows 31 characters.
        name = _SHM_PREFIX + secrets.token_hex(8)
        try:
            fd: int = _posixshmem.shm_open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode=0o600)
        except FileExistsError:
            continue
        _posixshmem.shm_unlink(name)
        break
    else:
        raise SharedAreaUnsupported("shm_open found 16 random names taken in a row; is /dev/shm shared and full?")
    try:
        os.set_inheritable(fd, False)
        # macOS sizes a shared memory object once only: size it to the cap now.
        # Its pages are allocated when touched, as they would be in a file.
        os.ftruncate(fd, cap)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_settings(cap: int, prefault: str) -> None:
    if cap < 0:
        raise ValueError(f"the shared memory cap must be >= 0 bytes, not {cap}")
    if prefault not in PREFAULT_METHODS:
        raise ValueError(f"prefault must be one of {PREFAULT_METHODS}, not {prefault!r}")
    if prefault == "map_populate" and not hasattr(mmap, "MAP_POPULATE"):
        raise ValueError(f"prefault='map_populate' needs Linux's MAP_POPULATE, which {sys.platform} lacks; use 'touch'")


class SharedArea:
    """One worker's shared memory area, as one end (parent or worker) sees it.

    Create it in the parent with ``SharedArea.create(cap)``, pass ``fileno()``
    to the worker, and there wrap the received fd with ``SharedArea.attach(fd,
    cap)``. Messages alternate strictly (one job out, one result back), so the
    two ends never write at the same time.

    Args:
        fd: The area's file descriptor; the area owns it and closes it.
        cap: The largest size the area may grow to, in bytes. Buffers that
            would not fit below it travel over the socket instead (see ``fits``).
        prefault: How a new mapping gets its pages: one of ``PREFAULT_METHODS``.
    """

    def __init__(self, fd: int, cap: int, prefault: str = DEFAULT_PREFAULT) -> None:
        _check_settings(cap, prefault)
        self._fd = fd
        # Which file the fd is: a job may close it and open another file on its
        # number, and a worker that mapped or grew that file would read wrong
        # arguments or lose its results silently (see ``_check_same_file``).
        found = os.fstat(fd)
        self._file_id = (found.st_dev, found.st_ino)
        self.cap = cap
        self._creator = False  # the parent's end (create), which places arguments and lends results
        self._prefault = prefault
        self._map: mmap.mmap | None = None
        self._size = 0  # bytes mapped here
        self._peer_size = 0  # bytes the other end has mapped, as its last descriptor said
        # Views handed out by read(), kept to learn whether the job still holds them.
        self._handed: list[memoryview] = []
        self._pieces: list[memoryview] = []
        self._reserved = 0  # end of the region read() handed out views into
        self._args = (0, 0)  # the region of the last arguments read(): results may lie in it
        self._keeper = BlockKeeper()  # for copies out (read_copy)
        self._closed = False
        # Where the worker may write results (see "Results lent from the area"):
        # the worker's own window there, the parent's mirror of it here (None:
        # not known, the next job must say it).
        self._window: tuple[int, int] | None = (0, cap)
        # The parent's results lent to the caller: token -> (start, end). Changed
        # from any thread (a lent array may go anywhere), so under a lock.
        self._lock = threading.Lock()
        self._lent: dict[int, tuple[int, int]] = {}
        self._tokens = 0
        self._written = (0, 0)  # the parent's last arguments, where a result may lie
        self._last_result = 0  # bytes the last result took beyond its arguments
        # For the idle trim (parent): whether a job may be using the area, and
        # since when nothing has.
        self.busy = False
        self.idle_since = 0.0
        self.idle_timeout = math.inf
        self.trimmed = False
        self.trim_lock = threading.Lock()

    @classmethod
    def create(cls, cap: int, *, backend: str = "auto", prefault: str = DEFAULT_PREFAULT) -> SharedArea:
        """A new, empty area (the parent's end).

        Args:
            cap: See the class.
            backend: ``"memfd"`` (Linux), ``"posix_shm"`` (shm_open and
                unlink; macOS), or ``"auto"``: the first of these that exists.
            prefault: See the class.

        Raises:
            SharedAreaUnsupported: Neither exists here; use the socket.
        """
        _check_settings(cap, prefault)
        if backend == "auto":
            reason = unsupported_reason()
            if reason is not None:
                raise SharedAreaUnsupported(f"no shared memory area: {reason}; large buffers go over the socket")
            backend = "memfd" if hasattr(os, "memfd_create") else "posix_shm"
        if backend == "memfd":
            if not hasattr(os, "memfd_create"):
                raise SharedAreaUnsupported(f"{sys.platform} has no memfd_create; try backend='posix_shm'")
            fd = _create_memfd()
        elif backend == "posix_shm":
            fd = _create_posix_shm(cap)
        else:
            raise ValueError(f"backend must be 'auto', 'memfd' or 'posix_shm', not {backend!r}")
        area = cls(fd, cap, prefault)
        area._creator = True
        return area

    @classmethod
    def attach(cls, fd: int, cap: int, *, prefault: str = DEFAULT_PREFAULT) -> SharedArea:
        """The worker's end of an area, from the fd it was given (now owned by the area)."""
        return cls(fd, cap, prefault)

    def fileno(self) -> int:
        self._check_open()
        return self._fd

    @property
    def size(self) -> int:
        """Bytes of the area mapped (and pre-touched) at this end."""
        return self._size

    @property
    def kept_bytes(self) -> int:
        """Bytes of the result block kept here for the next large result (see
        `BlockKeeper`): the parent's own memory, not the area's."""
        return self._keeper.kept_bytes

    @property
    def private_bytes(self) -> int:
        """Bytes of the area mapped here and not yet by the other end.

        Those pages count in this process's USS (``Private_*`` in smaps); the
        rest are mapped by both ends and count as shared. Exact as long as
        both ends pre-touch their mappings, which every method but ``"none"`` does.
        """
        return max(0, self._size - self._peer_size)

    def counted_bytes(self, metric: str) -> int:
        """Bytes of the area that this process's memory figure by ``metric``
        ("uss", "pss", "rss") includes: subtract them to leave the area out."""
        private = self.private_bytes
        if metric == "uss":
            return private
        if metric == "pss":
            return private + (self._size - private) // 2
        return self._size

    def peer_caught_up(self) -> None:
        """The other end has read everything this end wrote (it answered
        since): it has mapped the whole area, so no page of it is private."""
        self._peer_size = max(self._peer_size, self._size)

    @property
    def holds_views(self) -> bool:
        """True while views ``read`` handed out are not released."""
        return bool(self._handed)

    @property
    def closed(self) -> bool:
        return self._closed

    # --- writing --------------------------------------------------------------

    def fits(self, buffers: Sequence[Any]) -> bool:
        """True if ``write(buffers)`` would work: every buffer is one contiguous
        block, and together they fit below the cap (the parent: around the
        results it lends; the worker: in its window). Otherwise send them over
        the socket."""
        if self._closed:
            return False
        try:
            lengths = [as_raw(buffer).nbytes for buffer in buffers]
        except BufferError:
            return False
        return self._place(lengths) is not None

    def _place(self, lengths: list[int]) -> tuple[tuple[tuple[int, int], ...], int, tuple[int, int]] | None:
        """Where buffers of these lengths go: their extents, their end, and the
        window for the reply; None if they do not fit.

        The worker writes in its window. The parent picks the lowest gap between
        the results it lends that holds the arguments and, after them, as much
        as the last result took (its reply goes there); else the top gap."""
        window = self._window
        if not self._creator:
            if window is None:
                return None
            extents, end = layout(lengths, max(self._reserved, window[0]))
            return (extents, end, window) if end <= window[1] else None
        with self._lock:
            lent = sorted(self._lent.values())
        gaps = []
        position = 0
        for start, end in lent:
            if start > position:
                gaps.append((position, start))
            position = max(position, end)
        if position < self.cap:
            gaps.append((position, self.cap))
        for index, (start, gap_end) in enumerate(gaps):
            extents, end = layout(lengths, start)
            room = gap_end - aligned(end)
            if room >= self._last_result or (index == len(gaps) - 1 and end <= gap_end):
                return extents, end, (aligned(end), gap_end)
        return None

    def write(self, buffers: Sequence[Any]) -> bytes:
        """Copy ``buffers`` into the area (growing it if need be); return the
        encoded descriptor to send in their place.

        The parent's descriptor also tells the worker its new window; the
        worker's window then starts after what it wrote (the parent may lend it).

        Raises:
            BufferError: A buffer is not contiguous (``fits`` says so first).
            ValueError: They do not fit (``fits`` says so first).
            OSError: The area could not grow to hold them (EFBIG under
                RLIMIT_FSIZE, ENOMEM under RLIMIT_AS); it is as it was: send
                them over the socket.
        """
        self._check_open()
        views = [as_raw(buffer) for buffer in buffers]
        placed = self._place([view.nbytes for view in views])
        if placed is None:
            raise ValueError(
                f"{len(views)} buffers ({sum(view.nbytes for view in views)} bytes) do not fit in the shared "
                f"memory area (cap {self.cap}); check fits() first and send them over the socket"
            )
        extents, end, window = placed
        self._grow_to(end, writer=True)
        assert self._map is not None or end == 0
        if self._map is not None:
            with memoryview(self._map) as area:
                for view, (offset, length) in zip(views, extents, strict=True):
                    area[offset : offset + length] = view
        if self._creator:
            self._window = window
            self._written = (extents[0][0], end) if extents else (window[0], window[0])
            return encode_descriptor(Descriptor(self._size, extents, window))
        if extents:
            self._window = (aligned(end), window[1])
        return encode_descriptor(Descriptor(self._size, extents))

    def describe_in_place(self, buffers: Sequence[Any]) -> bytes | None:
        """The worker's descriptor for result buffers that all lie in its last
        arguments (a job that returns its argument, or a slice of it): nothing
        to copy. None if any does not, or cannot be located."""
        if self._creator or not self._handed or self._map is None:
            return None
        start, end = self._args
        try:
            import ctypes

            with memoryview(self._map) as whole:
                base = ctypes.addressof(ctypes.c_char.from_buffer(whole))
            extents = []
            for buffer in buffers:
                view = as_raw(buffer)
                if view.readonly or not view.nbytes:
                    return None
                offset = ctypes.addressof(ctypes.c_char.from_buffer(view)) - base
                extents.append((offset, view.nbytes))
                del view
        except (BufferError, TypeError, ValueError):
            return None
        previous = start
        for offset, length in extents:
            if offset % ALIGN or offset < previous or offset + length > end:
                return None
            previous = offset + length
        return encode_descriptor(Descriptor(self._size, tuple(extents)))

    # --- reading --------------------------------------------------------------

    def read(self, descriptor: bytes | memoryview) -> list[memoryview]:
        """Views of the buffers a descriptor names, straight into the area (no copy).

        For the worker's arguments: valid until the other end writes again.
        Writable, like the arrays an in-band pickle would give. Call
        ``release`` when the job is over, before replying.
        """
        if self._handed:
            raise RuntimeError(
                "read() again while the views of the last message are still out: call release() after each "
                "job, and stop using an area whose release() returned False"
            )
        try:
            found = self._locate(descriptor)
        except OSError as exc:  # it could not be mapped at the size the writer announced
            self._unmap_if_unused()
            found = decode_descriptor(descriptor)
            self._take_window(found)
            return self._read_from_file(found, exc, "arguments")
        self._take_window(found)
        if not found.extents:
            return []
        if self._map is None:  # an empty area: only zero-length buffers fit in it
            return [memoryview(bytearray()) for _ in found.extents]
        base = memoryview(self._map)
        for offset, length in found.extents:
            piece = base[offset : offset + length]
            # A new buffer export rooted at `piece`: whatever keeps the bytes
            # alive (numpy keeps its own view of the view) keeps an export on
            # `piece`, so piece.release() fails exactly while it is referenced.
            wrapper = pickle.PickleBuffer(piece)
            handed = memoryview(wrapper)
            wrapper.release()
            self._pieces.append(piece)
            self._handed.append(handed)
        self._pieces.append(base)
        self._reserved = found.extents[-1][0] + found.extents[-1][1]
        self._args = (found.extents[0][0], self._reserved)
        return list(self._handed)

    def _take_window(self, found: Descriptor) -> None:
        """The worker's window from now on, as the parent's descriptor says."""
        start, end = found.window
        if end:
            if end > self.cap:
                raise DescriptorError(f"the other end says results may go up to {end}, above the cap of {self.cap}")
            self._window = (start, end)

    def release(self) -> bool:
        """Let go of the views ``read`` handed out; True if nothing holds them now.

        False means an object the job kept (a global, a cache) still uses the
        area's bytes: the next message would change them under it. The caller
        must then stop reusing this area (retire the worker). The views stay
        valid for whoever holds them; later ``write``\\s go after them.
        """
        if not self._handed:
            return True
        if not self._try_release():
            gc.collect()  # a reference cycle (a traceback, say) may be all that holds them
            if not self._try_release():
                return False
        self._handed.clear()
        self._pieces.clear()
        self._reserved = 0
        self._args = (0, 0)
        return True

    def _try_release(self) -> bool:
        free = True
        for view in (*self._handed, *self._pieces):
            try:
                view.release()
            except BufferError:
                free = False
        return free

    def read_copy(self, descriptor: bytes | memoryview) -> list[memoryview]:
        """Copies of the buffers a descriptor names, for the parent's results.

        They share one new writable block, at offsets aligned as in the area:
        arrays rebuilt on them are writable and aligned, and belong to the
        caller, whatever the area holds next.
        """
        try:
            found = self._locate(descriptor)
        except OSError as exc:  # it could not be mapped at the size the writer announced
            found = decode_descriptor(descriptor)
            self._follow_result(found)
            return self._read_from_file(found, exc, "result")
        self._follow_result(found)
        return self._copy_found(found)

    def lend(self, descriptor: bytes | memoryview) -> list[memoryview]:
        """The buffers a descriptor names, for the parent's results, straight
        from the area: no copy.

        They share one writable ctypes array over the area's bytes. While it
        (or any view of it, such as an array rebuilt on it) lives, its region is
        *lent*: no argument and no result is placed over it (see "Results lent
        from the area"); it stays mapped after the area is closed and the
        worker gone. A result the worker put outside the window it was given is
        copied out instead (``read_copy``).
        """
        try:
            found = self._locate(descriptor)
        except OSError as exc:  # it could not be mapped at the size the writer announced
            found = decode_descriptor(descriptor)
            self._follow_result(found)
            return self._read_from_file(found, exc, "result")
        if not self._follow_result(found) or self._map is None or not found.extents:
            # Outside its window (the next job tells the worker a new one), or
            # nothing to lend.
            return self._copy_found(found)
        start = found.extents[0][0]
        end = found.extents[-1][0] + found.extents[-1][1]
        if end == start:
            return [memoryview(bytearray()) for _ in found.extents]
        import ctypes

        lent = (ctypes.c_char * (end - start)).from_buffer(self._map, start)
        with self._lock:
            self._tokens += 1
            token = self._tokens
            self._lent[token] = (start, end)
        weakref.finalize(lent, self._returned, token)
        target = memoryview(lent).cast("B")
        return [target[offset - start : offset - start + length] for offset, length in found.extents]

    def _copy_found(self, found: Descriptor) -> list[memoryview]:
        if self._map is None:
            return [memoryview(bytearray()) for _ in found.extents]
        if not found.extents:
            return []
        start = found.extents[0][0]
        end = found.extents[-1][0] + found.extents[-1][1]
        with memoryview(self._map) as area:
            target = memoryview(_copy_of(area[start:end], self._keeper)).cast("B")
        return [target[offset - start : offset - start + length] for offset, length in found.extents]

    def _follow_result(self, found: Descriptor) -> bool:
        """Mirror what the worker did to its window by writing this result;
        True if the result lies where it could (then it is safe to lend)."""
        if not found.extents:
            return True
        start = found.extents[0][0]
        end = found.extents[-1][0] + found.extents[-1][1]
        written, self._written = self._written, (0, 0)  # this job's arguments, once
        if written[0] <= start and end <= written[1]:
            self._last_result = 0  # in the arguments: the window is as it was
            return True
        window = self._window
        if window is not None and window[0] <= start and end <= window[1]:
            self._window = (aligned(end), window[1])
            self._last_result = end - window[0]
            return True
        self._window = None
        return False

    def _returned(self, token: int) -> None:
        # The lent array is going (any thread): its region is free again.
        with self._lock:
            self._lent.pop(token, None)

    @property
    def lent_bytes(self) -> int:
        """Bytes of results lent to the caller that are still alive."""
        with self._lock:
            return sum(end - start for start, end in self._lent.values())

    def wants_window(self) -> bool:
        """Whether the next job should tell the worker a new window even if it
        has no arguments in the area: the worker's is unknown, or too small for
        a result like the last one while a larger one is free."""
        window = self._window
        if window is None:
            return True
        if window == (0, self.cap):
            return False
        if window[1] - window[0] < self._last_result + ALIGN:
            return True
        # A lower gap (results held earlier have gone) keeps the area from
        # growing while each result is held until the next one comes; a larger
        # one lets larger results in.
        placed = self._place([])
        return placed is not None and (placed[2][0] < window[0] or placed[2][1] > window[1])

    def missed(self, size: int) -> None:
        """A result of ``size`` bytes came over the socket (it did not fit in
        the worker's window): the next job gives it room for one like it."""
        self._last_result = max(self._last_result, size)

    def trim(self) -> int:
        """Give back the pages of the area that no lent result uses (Linux:
        MADV_REMOVE frees them from the file, for both ends), and the kept copy
        block. The parent calls it when no job uses the area. Returns the bytes
        of mapping it covered; 0 where there is no MADV_REMOVE."""
        remove = getattr(mmap, "MADV_REMOVE", None)
        self._keeper.drop()
        if remove is None or self._closed or self._map is None:
            return 0
        with self._lock:
            lent = sorted(self._lent.values())
        freed = 0
        position = 0
        for start, end in (*lent, (self._size, self._size)):
            # Whole pages only: a page a lent result shares keeps its bytes.
            low = -(-position // PAGE) * PAGE
            high = min(start, self._size) // PAGE * PAGE
            if high > low:
                try:
                    self._map.madvise(remove, low, high - low)
                except (OSError, ValueError):  # no MADV_REMOVE for this file; or closed
                    return freed
                freed += high - low
            position = max(position, end)
        return freed

    def resident_bytes(self) -> int:
        """Bytes of memory the area's file holds now (its pages allocated)."""
        if self._closed:
            return 0
        try:
            blocks = os.fstat(self._fd).st_blocks
        except (OSError, AttributeError):
            return self._size
        return int(blocks) * 512

    def _read_from_file(self, found: Descriptor, map_error: OSError, what: str) -> list[memoryview]:
        """Copies of the buffers ``found`` names, read from the area's file
        without mapping it (see "When the area cannot grow or be mapped").

        They share one new writable block, at offsets as in the area.
        ``what`` they are, for the error: "arguments" or "result".

        Raises:
            AreaMemoryError: Not even the copy fits in this process's memory.
        """
        if not found.extents:
            return []
        start = found.extents[0][0]
        end = found.extents[-1][0] + found.extents[-1][1]
        try:
            block = bytearray(end - start)
        except MemoryError:
            raise AreaMemoryError(
                f"the {what} ({end - start} bytes in {len(found.extents)} buffers) in the shared memory area "
                f"did not fit in process {os.getpid()}'s memory: mapping the area ({found.area_size} bytes) "
                f"failed ({map_error}), and so did a private copy of them. {_address_space_limit(what)}"
            ) from map_error
        target = memoryview(block)
        done = 0
        while done < len(target):
            # pread, not a mapping: it needs no address space beyond the block.
            read = _pread_into(self._fd, target[done:], start + done)
            if read == 0:
                raise DescriptorError(
                    f"the other end says the area has {found.area_size} bytes, but reading it ended at "
                    f"{start + done}; was it given another area's descriptor?"
                )
            done += read
        return [target[offset - start : offset - start + length] for offset, length in found.extents]

    def _unmap_if_unused(self) -> None:
        """Give the current mapping back if no view uses it: the memory it
        holds may be what a copy needs."""
        if self._map is None or self._handed:
            return
        try:
            self._map.close()
        except BufferError:  # views a job kept from earlier still use it
            return
        self._map = None
        self._size = 0

    def _locate(self, descriptor: bytes | memoryview) -> Descriptor:
        self._check_open()
        found = decode_descriptor(descriptor)
        if found.area_size > self.cap:
            raise DescriptorError(
                f"the other end says the area has {found.area_size} bytes, above its cap of {self.cap}"
            )
        self._peer_size = max(self._peer_size, found.area_size)
        self._grow_to(found.area_size, writer=False)
        return found

    # --- growth ---------------------------------------------------------------

    def _grow_to(self, needed: int, *, writer: bool) -> None:
        """Map at least ``needed`` bytes; as the writer, extend the area first."""
        if needed <= self._size:
            return
        found = os.fstat(self._fd)
        self._check_same_file(found)
        if writer:
            new_size = min(self.cap, max(-(-needed // _GROWTH_STEP) * _GROWTH_STEP, self._size + self._size // 2))
            if found.st_size < new_size:
                os.ftruncate(self._fd, new_size)
        else:
            new_size = needed
            file_size = found.st_size
            if file_size < new_size:
                # Mapping past the end of the file would be SIGBUS at the first access.
                raise DescriptorError(
                    f"the other end says the area has {new_size} bytes, but it has {file_size}; "
                    "was it given another area's descriptor?"
                )
        self._map_again(new_size)

    def _check_same_file(self, found: os.stat_result) -> None:
        """Raise DescriptorError (not an OSError: nothing may fall back to
        reading or writing this fd) if the area's fd is another file now."""
        if (found.st_dev, found.st_ino) != self._file_id:
            raise DescriptorError(
                f"the shared memory area's file descriptor {self._fd} in process {os.getpid()} is another "
                "file now: a job closed it (os.closerange?) and opened something on its number"
            )

    def _map_again(self, size: int) -> None:
        flags = mmap.MAP_SHARED
        if self._prefault == "map_populate":
            flags |= mmap.MAP_POPULATE
        # A mapping keeps a duplicate of the fd open for as long as it lives,
        # and a lent result keeps its mapping: from Python 3.13 on it need not.
        extra = {"trackfd": False} if sys.version_info >= (3, 13) else {}
        new_map = mmap.mmap(self._fd, size, flags=flags, **extra)
        if self._prefault == "madvise":
            try:
                new_map.madvise(_MADV_POPULATE_WRITE)
            except OSError:  # before Linux 5.14
                _touch(new_map)
        elif self._prefault == "touch":
            _touch(new_map)
        old, self._map, self._size = self._map, new_map, size
        if old is not None:
            try:
                old.close()
            except BufferError:
                # Views read() handed out still use the old mapping; it is
                # unmapped when the last of them goes.
                pass

    # --- closing --------------------------------------------------------------

    def close(self) -> None:
        """Unmap the area and close its fd. Views still held elsewhere keep
        their mapping (and the memory) until they go."""
        with self.trim_lock:  # not while the parent's trimmer uses the mapping
            self._close()

    def forget_after_fork(self) -> None:
        """In a child forked from the process that holds this area: drop our
        copies of its fd and mapping, and nothing else. No trim: the file's
        pages are the parent's and its worker's (MADV_REMOVE would free them
        under them); no lock: another thread may have held one at the fork."""
        if self._closed:
            return
        self._closed = True
        self._map = None  # unmapped when the last view of it goes
        os.close(self._fd)

    def _close(self) -> None:
        if self._closed:
            return
        if self._creator and self._lent:
            # Lent results keep the file alive, and with it every page of it:
            # give back all but theirs now, not when the last of them goes.
            self.trim()
        self._closed = True
        self._let_go_of_views()
        self._keeper.close()
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass
            self._map = None
        os.close(self._fd)

    def _let_go_of_views(self) -> None:
        """Drop the views ``read`` handed out and their pieces; the pieces that
        something still exports from go to ``_stranded``, never to the garbage."""
        self._try_release()
        _strand(self._pieces)
        self._handed.clear()
        self._pieces.clear()

    def __del__(self) -> None:
        # An area collected unclosed (garbage in a cycle, say) with views still
        # held: keep their pieces reachable. A finalizer runs before the collector
        # clears anything, and what it makes reachable again is not cleared.
        if not getattr(self, "_closed", True):
            self._let_go_of_views()

    def __enter__(self) -> SharedArea:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this shared memory area is closed")

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fd}"
        return f"<SharedArea {state} size={self._size} cap={self.cap}>"


# Pieces of closed or collected areas (see ``SharedArea.read``) that a view
# still held somewhere exports from. Each stays here, reachable, until that
# view is gone: see "Views and the garbage collector" above.
_stranded: list[memoryview] = []


def _strand(pieces: Iterable[memoryview]) -> None:
    """Keep the pieces that cannot be released yet in ``_stranded``, and let go
    of those stranded earlier that can be now."""
    _stranded[:] = [piece for piece in (*_stranded, *pieces) if not _released(piece)]


def _released(view: memoryview) -> bool:
    try:
        view.release()
    except BufferError:
        return False
    return True


def _pread_into(fd: int, target: memoryview, offset: int) -> int:
    """Read from ``fd`` at ``offset`` into ``target``; the count read."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [target], offset)
    # macOS before 11: pread returns new bytes; 16 MiB at a time bounds them.
    data = os.pread(fd, min(len(target), 16 << 20), offset)
    target[: len(data)] = data
    return len(data)


def _address_space_limit(what: str) -> str:
    """What to tell someone whose process ran out of memory for ``what``
    ("arguments" or "result"): its RLIMIT_AS, if one is set."""
    smaller = "pass smaller arguments" if what == "arguments" else "return a smaller result"
    try:
        import resource  # POSIX only; so is the shared memory area
    except ImportError:
        return f"Free some memory, or {smaller}."
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return f"Free some memory, or {smaller}."
    return (
        f"Its address-space limit (RLIMIT_AS, set by an init hook, a job, or the shell: ulimit -v) is "
        f"{soft} bytes: raise it, or {smaller}."
    )


def _touch(area: mmap.mmap) -> None:
    """Fault every page in by reading and writing back its first byte (safe
    for pages that hold data: each byte is written with its own value)."""
    area[::PAGE] = area[::PAGE]


def _copy_of(source: memoryview, keeper: BlockKeeper) -> Any:
    """A writable block (at least 16-byte aligned) holding a copy of ``source``,
    lent through an object whose end gives the block back to ``keeper``.

    The block the keeper kept, if one fits (its pages are in memory already).
    Else, below ``_HUGE_COPY_MIN``, a bytearray made from ``source``: allocated
    and copied in one pass over the memory, where a zeroed ``bytearray(size)``
    filled afterwards takes two (1 MiB right after the process idled: 105 µs
    against 225 µs). From there on a private mapping (with transparent huge pages on Linux).
    """
    size = source.nbytes
    block = keeper.take(size)
    if block is None:
        if size < _HUGE_COPY_MIN or not hasattr(mmap, "MAP_PRIVATE"):
            return keeper.lend(bytearray(source), size)
        # Page-aligned on every POSIX system (a bytearray is only 16-byte aligned).
        block = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        huge = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
        if huge is not None:
            try:
                block.madvise(huge)
            except OSError:
                pass  # transparent huge pages disabled: 4 KiB pages then
    with memoryview(block) as target:
        target[:size] = source
    return keeper.lend(block, size)


class BlockKeeper:
    """The last large result block the caller let go of, kept for the next one.

    A result is copied out of the area into new memory; when the caller's
    array goes, that memory would go back to the kernel (glibc returns large
    blocks), and the next result would have its pages allocated and zeroed
    again: half of the copy's time here, and far more on a virtual machine
    whose host takes back memory the guest freed (measured on the
    development VM: 128 MiB copied out in 19-25 ms, and now and then 90-260
    ms with the same 64 huge page faults). So the block is lent through a
    ctypes array over it (any Python version can tell when that goes: a weak
    reference), and when it goes the keeper keeps the block, one at most,
    for the next result that fits in it and needs at least half of it. The
    area closes its keeper, and with it the block kept.
    """

    __slots__ = ("_lock", "_block", "_closed")

    def __init__(self) -> None:
        self._lock = threading.Lock()  # blocks come back from whichever thread drops an array
        self._block: bytearray | mmap.mmap | None = None
        self._closed = False

    def take(self, size: int) -> bytearray | mmap.mmap | None:
        with self._lock:
            block = self._block
            if block is None or not size <= len(block) <= 2 * size:
                return None
            self._block = None
        return block

    def lend(self, block: bytearray | mmap.mmap, size: int) -> Any:
        """An object exporting the first ``size`` bytes of ``block``; the block
        comes back here when it is gone."""
        import ctypes

        exported = (ctypes.c_char * size).from_buffer(block)
        weakref.finalize(exported, self._give_back, block)
        return exported

    def _give_back(self, block: bytearray | mmap.mmap) -> None:
        # Called as the lending array goes, before its export of the block is
        # released: a block not kept is dropped, not closed, and unmapped when
        # its last reference goes, right after.
        with self._lock:
            if not self._closed:
                self._block = block  # the newest stays; an older one is dropped

    @property
    def kept_bytes(self) -> int:
        block = self._block
        return 0 if block is None else len(block)

    def drop(self) -> None:
        """Let the kept block go (the area has been idle)."""
        with self._lock:
            block, self._block = self._block, None
        if isinstance(block, mmap.mmap):
            block.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            block, self._block = self._block, None
        if isinstance(block, mmap.mmap):
            block.close()


# --- memory accounting ---------------------------------------------------------

# What each metric counts, per mapping in /proc/<pid>/smaps.
_SMAPS_FIELDS = {
    "uss": (b"Private_Clean:", b"Private_Dirty:"),
    "pss": (b"Pss:",),
    "rss": (b"Rss:",),
}
_AREA_PATHS = (b"/memfd:" + MEMFD_NAME.encode(), b"/dev/shm" + _SHM_PREFIX.encode())


def area_memory(metric: str = "uss", pid: int | None = None) -> int | None:
    """Bytes of shared memory areas that process ``pid`` (default: this one)
    has mapped, as ``metric`` counts them; None where /proc is not there.

    Subtract it from the process's figure by the same metric to leave the
    areas out of a memory limit. Costs a read of /proc/<pid>/smaps: about 3 ms
    for a process with numpy and scipy imported; within a worker,
    ``SharedArea.private_bytes`` answers for USS without it.
    """
    fields = _SMAPS_FIELDS.get(metric)
    if fields is None:
        raise ValueError(f"memory metric must be one of {tuple(_SMAPS_FIELDS)}, not {metric!r}")
    try:
        with open(f"/proc/{'self' if pid is None else pid}/smaps", "rb") as f:
            text = f.read()
    except OSError:
        return None
    total_kb = 0
    in_area = False
    for line in text.splitlines():
        if not line[:1].isupper():  # a mapping's first line: "start-end perms offset dev inode path"
            parts = line.split(None, 5)
            in_area = len(parts) == 6 and parts[5].startswith(_AREA_PATHS)
        elif in_area and line.startswith(fields):
            total_kb += int(line.split()[1])
    return total_kb * 1024
