"""The wire protocol between the parent and a worker, without any I/O.

Both ends hold a `Connection` (h11's shape): ``send(event)`` turns a message
into the byte pieces of one frame, ``receive_data(bytes)`` feeds what arrived,
and ``next_event()`` hands back typed events, checked against what that end
may receive. The I/O around it differs (blocking in the worker, Trio in the
parent) and lives with each side; nothing here reads or writes a socket.

Every message is a *frame*: a 10-byte header (kind, flags, payload length)
followed by the payload. Conversation on one worker channel::

    parent                          worker
    Config (first frame only)  ->
    Area  (+ fd; at most once) ->
                               <-   InitFailed   (init raised; worker exits)
                               <-   Started      (init done; only if an init
                                                  hook or max_memory is set)
    Job                        ->
                               <-   Value | Error (carries a Retire reason)
                               <-   Bye          (idle timeout; worker exits)
    EOF                        ->   worker exits cleanly

A Job or a Value may carry large pickle-5 buffers beside its pickle (the
``_BUFFERS`` frame kinds), so they are never copied into it. On an AF_UNIX
channel, buffers that reach a threshold travel through the worker's shared
memory area instead (``_shm``): the parent sends one ``Area`` frame, whose
file descriptor rides on the same ``sendmsg`` (SCM_RIGHTS), before the first
job that needs it; from then on a Job or Value may be an ``_AREA`` frame,
whose payload is a ``_shm`` descriptor (where its buffers lie in the area)
followed by the pickle. The Connection checks descriptors but never touches
the area or the fd: the I/O layer of each end does. A worker that
retires says so in the flags of its last result, so the parent never sends a
job to a worker that is leaving. A Bye can only follow a reply.
"""

from __future__ import annotations

import enum
import struct

from ._shm import Descriptor, DescriptorError, decode_descriptor, descriptor_length

HEADER = struct.Struct("!BBQ")
_HEADER_SIZE = HEADER.size
_unpack_header = HEADER.unpack_from


class Kind(enum.IntEnum):
    CONFIG = 1
    JOB = 2
    JOB_BUFFERS = 3
    AREA = 4
    JOB_AREA = 5
    VALUE = 10
    ERROR = 11
    INIT_FAILED = 12
    BYE = 13
    VALUE_BUFFERS = 14
    STARTED = 15
    VALUE_AREA = 16


# Module-level names for the kinds. The hot paths use these, not ``Kind.X``:
# on Python 3.11 looking a member up on an Enum class costs about 140 ns,
# ten times a global.
CONFIG, JOB, JOB_BUFFERS = Kind.CONFIG, Kind.JOB, Kind.JOB_BUFFERS
VALUE, ERROR, INIT_FAILED, BYE = Kind.VALUE, Kind.ERROR, Kind.INIT_FAILED, Kind.BYE
VALUE_BUFFERS, STARTED = Kind.VALUE_BUFFERS, Kind.STARTED
AREA, JOB_AREA, VALUE_AREA = Kind.AREA, Kind.JOB_AREA, Kind.VALUE_AREA


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

# Retire reasons by flag value (a tuple index, not an Enum call), and the one
# the warm path compares with.
_RETIRES = tuple(Retire)
KEEP = Retire.KEEP


class ProtocolError(Exception):
    """The byte stream does not hold valid frames, or holds one this end may not get."""


# --- events ---------------------------------------------------------------------


class Config:
    """The worker's settings (a pickled `WorkerSettings`), sent before its first job."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


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


_AREA = struct.Struct("!QQ")


class Job:
    """A pickled ``(fn, args)``, with its out-of-band buffers.

    ``area``: if not None, the buffers are in the shared memory area, where
    this encoded descriptor says; the I/O layer fills ``buffers`` from it.
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
    """A job's exception, its chain and traceback (see ``_errorcodec``)."""

    __slots__ = ("payload", "retire")

    def __init__(self, payload: bytes, retire: Retire = Retire.KEEP) -> None:
        self.payload = payload
        self.retire = retire


class InitFailed:
    """The worker's ``init`` hook (or the template's preload) raised; it leaves."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class Started:
    """The worker's ``init`` hook returned: a death from now on is the job's.
    ``memory``: its memory (by the context's metric) before any job, when
    that is already above ``max_memory``; else -1."""

    __slots__ = ("memory",)

    def __init__(self, memory: int = -1) -> None:
        self.memory = memory


_STARTED = struct.Struct("!q")


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

Event = Config | Area | Job | Value | Error | InitFailed | Started | Bye | Closed

# What each end may receive.
_PARENT_RECEIVES = {
    VALUE,
    VALUE_BUFFERS,
    VALUE_AREA,
    ERROR,
    INIT_FAILED,
    STARTED,
    BYE,
}
_WORKER_RECEIVES = {Kind.CONFIG, Kind.AREA, Kind.JOB, Kind.JOB_BUFFERS, Kind.JOB_AREA}
_WITH_RETIRE = {Kind.VALUE, Kind.VALUE_BUFFERS, Kind.VALUE_AREA, Kind.ERROR}
_KIND_VALUES = {int(kind) for kind in Kind}

# How much either end asks of its socket per read: a small frame, or the head
# of a large one (whose payload then goes into a buffer of its own size).
RECV_SIZE = 1 << 16

# Payloads from this size on are received into a buffer of their own size.
LARGE_PAYLOAD = 1 << 16


# --- framing ------------------------------------------------------------------------


def encode_frame(kind: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return HEADER.pack(kind, flags, len(payload)) + payload


# Buffers start at multiples of this within the payload, so that arrays
# rebuilt on the receiver's buffer are aligned for their element type.
_ALIGN = 64
_COUNT = struct.Struct("!I")


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


def frame_parts(kind: int, pickled: bytes, buffers: list[memoryview], flags: int = 0) -> list[bytes | memoryview]:
    """The pieces of one frame, to be sent in order; large buffers are sent as
    they are (no copy). With buffers, ``kind`` becomes its _BUFFERS variant and
    the payload is: buffer count, the pickle's and each buffer's length, the
    pickle, then each buffer at an aligned offset (zero padding between)."""
    if not buffers:
        return [HEADER.pack(kind, flags, len(pickled)) + pickled]
    lengths = [len(pickled)] + [buffer.nbytes for buffer in buffers]
    head = _COUNT.pack(len(buffers)) + struct.pack(f"!{len(lengths)}Q", *lengths) + pickled
    parts: list[bytes | memoryview] = []
    offset = len(head)
    for buffer in buffers:
        padding = _aligned(offset) - offset
        if parts:
            parts.append(b"\0" * padding)
        else:
            head += b"\0" * padding
        parts.append(buffer)
        offset += padding + buffer.nbytes
    return [HEADER.pack(_WITH_BUFFERS[kind], flags, offset) + head, *parts]


_WITH_BUFFERS: dict[int, Kind] = {Kind.JOB: Kind.JOB_BUFFERS, Kind.VALUE: Kind.VALUE_BUFFERS}


def job_from_parts(parts: list[bytes | memoryview]) -> tuple[memoryview, list[memoryview]]:
    """The pickle and the buffers of a job that `frame_parts` cut into parts:
    its inverse, without copying anything (the buffers are the parts' own).

    The parent's caller hands the pool a job already framed for the socket; a
    job whose buffers go through the shared memory area is framed again from these.
    """
    if len(parts) == 1:
        header = HEADER.unpack_from(parts[0])
        if header[0] != JOB:
            raise ProtocolError(f"a job of one part is a JOB frame, not kind {header[0]}")
        return memoryview(parts[0])[HEADER.size :], []
    head = memoryview(parts[0])
    kind = head[0]
    if kind != JOB_BUFFERS:
        raise ProtocolError(f"a job of several parts is a JOB_BUFFERS frame, not kind {kind}")
    (count,) = _COUNT.unpack_from(head, HEADER.size)
    if len(parts) != 2 * count:
        raise ProtocolError(f"a JOB_BUFFERS frame of {count} buffers has {2 * count} parts, not {len(parts)}")
    start = HEADER.size + _COUNT.size
    (pickle_length,) = struct.unpack_from("!Q", head, start)
    start += 8 * (count + 1)
    # parts: the head (ending with padding), the first buffer, then padding
    # and buffer alternately.
    buffers = [memoryview(part) for part in parts[1::2]]
    return head[start : start + pickle_length], buffers


def area_parts(
    kind: int, descriptor: bytes | memoryview, pickled: bytes | bytearray | memoryview, flags: int = 0
) -> list[bytes | memoryview]:
    """The one piece of an _AREA frame: the descriptor, then the pickle."""
    length = len(descriptor) + len(pickled)
    return [HEADER.pack(_WITH_AREA[kind], flags, length) + bytes(descriptor) + bytes(pickled)]


_WITH_AREA: dict[int, Kind] = {Kind.JOB: Kind.JOB_AREA, Kind.VALUE: Kind.VALUE_AREA}


def split_area(payload: bytes | bytearray | memoryview, kind: Kind) -> tuple[memoryview, memoryview, Descriptor]:
    """The descriptor (encoded, and decoded: checked) and the pickle of an _AREA payload."""
    view = memoryview(payload)
    try:
        length = descriptor_length(view)
        descriptor = decode_descriptor(view[:length])
    except DescriptorError as exc:
        raise ProtocolError(f"a {kind.name} frame with a malformed shared memory descriptor: {exc}") from None
    return view[:length], view[length:], descriptor


def split_buffers(payload: bytes | bytearray | memoryview) -> tuple[memoryview, list[memoryview]]:
    """The pickle and the buffers of a _BUFFERS payload, as views (no copy of a
    large payload, which arrives in a bytearray: arrays rebuilt on it are
    writable, as they would be from an in-band pickle)."""
    if isinstance(payload, bytes):
        payload = bytearray(payload)
    view = memoryview(payload)
    try:
        (count,) = _COUNT.unpack_from(view)
        lengths = struct.unpack_from(f"!{count + 1}Q", view, _COUNT.size)
    except struct.error:
        raise ProtocolError("a buffer table that does not fit its payload") from None
    offset = _COUNT.size + 8 * (count + 1)
    pickled = view[offset : offset + lengths[0]]
    offset += lengths[0]
    buffers = []
    for length in lengths[1:]:
        offset = _aligned(offset)
        buffers.append(view[offset : offset + length])
        offset += length
    if offset != len(view):
        raise ProtocolError("buffer lengths do not add up to the payload")
    return pickled, buffers


class FrameReader:
    """The one framer: accumulates bytes and cuts them into ``(kind, flags,
    payload)`` frames, in order. A large payload can be received straight into
    a buffer of its own size (`payload_buffer`), without a growing buffer."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._large: bytearray | None = None  # the payload of a large frame being read
        self._large_header: tuple[int, int] = (0, 0)
        self._large_have = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._large is not None:
            take = min(len(data), len(self._large) - self._large_have)
            self._large[self._large_have : self._large_have + take] = data[:take]
            self._large_have += take
            data = data[take:]
        self._buffer += data

    @property
    def pending(self) -> int:
        """Bytes received that do not make a whole frame yet."""
        return len(self._buffer) + (HEADER.size + self._large_have if self._large is not None else 0)

    def peek_header(self) -> tuple[int, int, int] | None:
        """``(kind, flags, payload length)`` of the frame being read, once known."""
        if self._large is not None:
            return (*self._large_header, len(self._large))
        if len(self._buffer) < HEADER.size:
            return None
        kind, flags, length = HEADER.unpack_from(self._buffer)
        return kind, flags, length

    def payload_buffer(self) -> memoryview | None:
        """Where the rest of a large payload should be received (``recv_into``,
        then `received`), or None when an ordinary read will do."""
        if self._large is None:
            header = self.peek_header()
            if header is None or header[2] < LARGE_PAYLOAD:
                return None
            kind, flags, length = header
            if len(self._buffer) >= HEADER.size + length:
                return None  # already whole
            self._check_kind(kind)
            self._large = bytearray(length)
            start = self._buffer[HEADER.size :]
            self._large[: len(start)] = start
            self._large_have = len(start)
            self._large_header = (kind, flags)
            self._buffer = bytearray()
        return memoryview(self._large)[self._large_have :]

    def received(self, count: int) -> None:
        """``count`` bytes were written into the view `payload_buffer` gave."""
        self._large_have += count

    @staticmethod
    def _check_kind(kind: int) -> None:
        if kind not in _KIND_VALUES:
            raise ProtocolError(f"unknown frame kind {kind}")

    def next_frame(self) -> tuple[int, int, bytes | bytearray] | None:
        """Return ``(kind, flags, payload)`` or None if no whole frame is buffered."""
        if self._large is not None:
            if self._large_have < len(self._large):
                return None
            kind, flags = self._large_header
            large, self._large = self._large, None
            return kind, flags, large
        if len(self._buffer) < HEADER.size:
            return None
        kind, flags, length = HEADER.unpack_from(self._buffer)
        self._check_kind(kind)
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[HEADER.size : end])
        del self._buffer[:end]
        return kind, flags, payload


# --- the connection ----------------------------------------------------------------

PARENT = "parent"
WORKER = "worker"


class Connection:
    """One end of a worker channel, as a state machine over bytes.

    ``our_role`` is `PARENT` or `WORKER`; each end may only send and receive
    its own kinds of event, and a worker's first frame must be its Config.
    """

    def __init__(self, our_role: str) -> None:
        if our_role not in (PARENT, WORKER):
            raise ValueError(f"our_role must be {PARENT!r} or {WORKER!r}, not {our_role!r}")
        self.our_role = PARENT if our_role == PARENT else WORKER  # compared by identity
        self._receives = _PARENT_RECEIVES if our_role == PARENT else _WORKER_RECEIVES
        self._reader = FrameReader()
        self._eof = False
        self._configured = our_role == PARENT  # a worker must get its Config first
        self._area_cap: int | None = None  # set once the area is known on this channel

    # --- outgoing ---

    def send(self, event: Event) -> list[bytes | memoryview]:
        """The byte pieces of ``event``'s frame, to be written in order.

        For an `Area`, the I/O layer sends the area's fd with the first byte
        of this frame (SCM_RIGHTS). A Job or Value whose ``area`` is set has
        its buffers in the area already: only the descriptor and pickle go.
        """
        # Value first: a worker sends one per job.
        if isinstance(event, Value):
            self._check_sender(WORKER, event)
            if event.area is not None:
                return area_parts(VALUE, event.area, event.pickled, event.retire)
            return frame_parts(VALUE, event.pickled, event.buffers, event.retire)  # type: ignore[arg-type]
        if isinstance(event, Job):
            self._check_sender(PARENT, event)
            if event.area is not None:
                return area_parts(JOB, event.area, event.pickled)
            return frame_parts(JOB, event.pickled, event.buffers)  # type: ignore[arg-type]
        if isinstance(event, Area):
            self._check_sender(PARENT, event)
            if self._area_cap is not None:
                raise ProtocolError("this channel has its shared memory area already")
            self._area_cap = event.cap
            return [encode_frame(AREA, _AREA.pack(event.cap, event.threshold))]
        if isinstance(event, Error):
            self._check_sender(WORKER, event)
            return [encode_frame(ERROR, event.payload, event.retire)]
        if isinstance(event, Config):
            self._check_sender(PARENT, event)
            return [encode_frame(CONFIG, event.payload)]
        if isinstance(event, InitFailed):
            self._check_sender(WORKER, event)
            return [encode_frame(INIT_FAILED, event.payload)]
        if isinstance(event, Started):
            self._check_sender(WORKER, event)
            return [encode_frame(STARTED, _STARTED.pack(event.memory))]
        if isinstance(event, Bye):
            self._check_sender(WORKER, event)
            return [encode_frame(BYE)]
        raise TypeError(f"cannot send {event!r}")

    def _check_sender(self, sender: str, event: Event) -> None:
        if self.our_role != sender:
            raise ProtocolError(f"the {self.our_role} cannot send {type(event).__name__}")

    # --- incoming ---

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes that arrived; ``b""`` means the other end closed."""
        if not data:
            self._eof = True
        else:
            self._reader.feed(data)

    def next_event_from(self, data: bytes) -> Event | _NeedData:
        """`receive_data` then `next_event`, in one call: the warm path's.

        When nothing is buffered and ``data`` is exactly one frame (a small job
        or reply arrives so), its event is made from it without the framer.
        A warm call is dominated by what each process touches between two
        context switches, so this path is kept short.
        """
        reader = self._reader
        if type(data) is bytes and not reader._buffer and reader._large is None and len(data) >= _HEADER_SIZE:
            kind, flags, length = _unpack_header(data)
            if len(data) == _HEADER_SIZE + length:  # exactly one frame: no framer needed
                reader._check_kind(kind)
                return self._event(kind, flags, data[_HEADER_SIZE:])
        self.receive_data(data)
        return self.next_event()

    def payload_buffer(self) -> memoryview | None:
        """Where to ``recv_into`` the rest of a large payload, if one is being read
        (then call `received`); None when an ordinary read will do."""
        return self._reader.payload_buffer()

    def received(self, count: int) -> None:
        if count == 0:
            self._eof = True
        else:
            self._reader.received(count)

    @property
    def pending(self) -> int:
        """Bytes received that are not part of an event handed out yet."""
        return self._reader.pending

    def next_event(self) -> Event | _NeedData:
        """The next event, `NEED_DATA` if more bytes are needed, or `Closed` at EOF.

        Raises:
            ProtocolError: for an unknown kind, a kind this end may not receive,
                bad flags, or a malformed payload.
        """
        frame = self._reader.next_frame()
        if frame is None:
            if self._eof:
                return Closed(mid_frame=self._reader.pending > 0)
            return NEED_DATA
        return self._event(*frame)

    def _event(self, kind: int, flags: int, payload: bytes | bytearray) -> Event:
        """The event of one whole frame, checked against what this end may receive."""
        if kind not in self._receives:
            raise ProtocolError(f"the {self.our_role} received a {Kind(kind).name} frame, which only it sends")
        if kind in _WITH_RETIRE:
            if flags >= len(_RETIRES):
                raise ProtocolError(f"unknown retire reason {flags} in a {Kind(kind).name} frame")
            retire = _RETIRES[flags]
        elif flags:
            raise ProtocolError(f"a {Kind(kind).name} frame with flags {flags}")
        if not self._configured:
            if kind != CONFIG:
                raise ProtocolError(f"expected a CONFIG frame first, got {Kind(kind).name}")
            self._configured = True
        elif kind == CONFIG:
            raise ProtocolError("a second CONFIG frame")
        if kind == VALUE:
            return Value(payload, [], retire)
        if kind == VALUE_BUFFERS:
            pickled, buffers = split_buffers(payload)
            return Value(pickled, buffers, retire)
        if kind == ERROR:
            return Error(bytes(payload), retire)
        if kind == JOB:
            return Job(payload)
        if kind == JOB_BUFFERS:
            pickled, buffers = split_buffers(payload)
            return Job(pickled, buffers)
        if kind == VALUE_AREA or kind == JOB_AREA:
            encoded, pickled, descriptor = split_area(payload, Kind(kind))
            if self._area_cap is None:
                raise ProtocolError(f"a {Kind(kind).name} frame before any AREA frame")
            if descriptor.area_size > self._area_cap:
                raise ProtocolError(
                    f"a {Kind(kind).name} frame says the shared memory area has {descriptor.area_size} bytes, "
                    f"above its cap of {self._area_cap}"
                )
            if kind == JOB_AREA:
                return Job(pickled, area=encoded)
            return Value(pickled, retire=retire, area=encoded)
        if kind == AREA:
            if self._area_cap is not None:
                raise ProtocolError("a second AREA frame")
            if len(payload) != _AREA.size:
                raise ProtocolError(f"an AREA frame of {len(payload)} bytes, not {_AREA.size}")
            cap, threshold = _AREA.unpack(payload)
            self._area_cap = cap
            return Area(cap, threshold)
        if kind == CONFIG:
            return Config(bytes(payload))
        if kind == INIT_FAILED:
            return InitFailed(bytes(payload))
        if kind == STARTED:
            if len(payload) != _STARTED.size:
                raise ProtocolError(f"a STARTED frame of {len(payload)} bytes, not {_STARTED.size}")
            return Started(_STARTED.unpack(payload)[0])
        if payload:
            raise ProtocolError(f"a BYE frame with {len(payload)} payload bytes")
        return Bye()


# --- The template's control channel and status pipes -----------------------
#
# Parent -> template: fixed 9-byte records (command, sequence number).
#   FORK carries two fds by SCM_RIGHTS: the write end of its status pipe, then
#   the worker's end of its channel (in that order: short of fds, the kernel
#   delivers only the first, and the template can still fail the request on
#   its status pipe). Fork requests are numbered implicitly, 0, 1,
#   2, ... in the order the template receives them; KILL names that number, so
#   the template kills only a worker it has not reaped yet (never a reused pid).
# Template -> parent, on each worker's status pipe: 9-byte records.
#   PID <pid> right after the fork, then EXITED <wait status> once reaped, or
#   FORK_FAILED <errno> instead of both. CEILING <bytes> comes before EXITED
#   when the template killed the worker for crossing the memory ceiling.

CONTROL_RECORD = struct.Struct("!cQ")
STATUS_RECORD = struct.Struct("!cq")

FORK = b"F"
KILL = b"K"

PID = b"P"
EXITED = b"X"
FORK_FAILED = b"E"
CEILING = b"M"  # the template killed the worker at the memory ceiling; value: bytes used


def parse_records(data: bytes, record: struct.Struct) -> tuple[list[tuple[bytes, int]], bytes]:
    """Split ``data`` into whole records; return them and the leftover bytes."""
    whole = len(data) - len(data) % record.size
    records = [record.unpack_from(data, offset) for offset in range(0, whole, record.size)]
    return records, data[whole:]
