"""The events of the wire protocol: what each end sends and receives, typed.

Events are plain records; `connection.Connection` turns them into frames and
back. Pickles (a job, a result, an exception) travel as bytes here: the codec
(``_trio_parallel_fs_worker.codec``) makes and reads them.
"""

from __future__ import annotations

import enum

from .._settings import TemplateSettings, WorkerSettings


class ProtocolError(Exception):
    """The byte stream does not hold valid frames, or holds one this end may not get."""


class Retire(enum.IntEnum):
    """Why a worker leaves after the job whose reply carries this (flags)."""

    KEEP = 0
    MAX_JOBS = 1
    MEMORY = 2
    USER = 3
    HOOK_FAILED = 4  # the reply is an Error holding the retire hook's exception
    AREA_HELD = 5  # the job kept a reference into the shared memory area

    @property
    def reason(self) -> str:
        """The name statistics count it under."""
        return _REASONS[self]


_REASONS = {
    Retire.KEEP: "",
    Retire.MAX_JOBS: "jobs",
    Retire.MEMORY: "memory",
    Retire.USER: "user",
    Retire.HOOK_FAILED: "hook_error",
    Retire.AREA_HELD: "area",
}

# The one retire reason the warm path compares with, bound to a global: on
# Python 3.11 looking a member up on an Enum class costs about 140 ns, ten
# times a global.
KEEP = Retire.KEEP


class Config:
    """A start-up message, the first frame of a conversation: a worker's
    `WorkerSettings`, or the template's `TemplateSettings`."""

    __slots__ = ("settings",)

    def __init__(self, settings: WorkerSettings | TemplateSettings) -> None:
        self.settings = settings


class Ready:
    """The template preloaded its modules and froze: it takes fork requests now."""

    __slots__ = ("pid",)

    def __init__(self, pid: int) -> None:
        self.pid = pid


class Area:
    """The worker's shared memory area: its fd rides beside this frame (SCM_RIGHTS).

    Attributes:
        cap: The largest size the area may grow to, in bytes.
        threshold: Results whose out-of-band buffers total at least this many
            bytes go through the area (if they fit below ``cap``).
        fd: The area's file descriptor, set by the I/O layer that received it
            (-1 as the Connection hands the event out).
    """

    __slots__ = ("cap", "threshold", "fd")

    def __init__(self, cap: int, threshold: int, fd: int = -1) -> None:
        self.cap = cap
        self.threshold = threshold
        self.fd = fd


class Job:
    """A pickled ``(fn, args)``, with its out-of-band buffers.

    ``area``: if not None, the buffers are in the shared memory area, where
    this encoded `descriptor.Descriptor` says; the I/O layer fills ``buffers`` from it.
    """

    __slots__ = ("pickled", "buffers", "area")

    def __init__(
        self,
        pickled: bytes | bytearray | memoryview,
        buffers: list[memoryview] | None = None,
        area: bytes | memoryview | None = None,
    ) -> None:
        self.pickled = pickled
        self.buffers = buffers or []
        self.area = area


class Value:
    """A job's pickled result, with its out-of-band buffers (``area``: as for `Job`)."""

    __slots__ = ("pickled", "buffers", "retire", "area")

    def __init__(
        self,
        pickled: bytes | bytearray | memoryview,
        buffers: list[memoryview] | None = None,
        retire: Retire = Retire.KEEP,
        area: bytes | memoryview | None = None,
    ) -> None:
        self.pickled = pickled
        self.buffers = buffers or []
        self.retire = retire
        self.area = area


class Error:
    """A job's exception, its chain and traceback (``codec.encode_error``)."""

    __slots__ = ("payload", "retire")

    def __init__(self, payload: bytes, retire: Retire = Retire.KEEP) -> None:
        self.payload = payload
        self.retire = retire


class InitFailed:
    """The worker's ``init`` hook (or the template's preload) raised; it leaves.
    ``payload``: the exception (``codec.encode_error``)."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class Started:
    """The worker set itself up (its preload, where it imports one itself) and
    its ``init`` hook returned: a death from now on is the job's. Sent where
    there was an init hook or a preload of its own to report on. ``memory``:
    its memory (by the context's metric) before any job, when that is already
    above ``max_memory``; else -1."""

    __slots__ = ("memory",)

    def __init__(self, memory: int = -1) -> None:
        self.memory = memory


class Bye:
    """The worker's idle timeout fired: it left without reading anything more."""

    __slots__ = ()


class Closed:
    """The other end closed the channel. ``mid_frame``: in the middle of a frame."""

    __slots__ = ("mid_frame",)

    def __init__(self, mid_frame: bool) -> None:
        self.mid_frame = mid_frame


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()

Event = Config | Ready | Area | Job | Value | Error | InitFailed | Started | Bye | Closed
