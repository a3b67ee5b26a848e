"""Frames: the one framer, and the payload layouts of each kind of frame.

Every message is a *frame*: a 10-byte header (kind, flags, payload length)
followed by the payload. A Job or a Value may carry large pickle-5 buffers
beside its pickle (the ``_BUFFERS`` kinds), so they are never copied into
it; or, on a channel with a shared memory area, a descriptor of where its
buffers lie in the area (the ``_AREA`` kinds). Pure functions over bytes: no
I/O, no state beyond what `FrameReader` buffers.
"""

from __future__ import annotations

import enum
import struct

from .descriptor import ALIGN, Descriptor, DescriptorError, decode_descriptor, descriptor_length
from .events import ProtocolError

HEADER = struct.Struct("!BBQ")
_HEADER_SIZE = HEADER.size


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
    READY = 17


# Module-level names for the kinds. The hot paths use these, not ``Kind.X``:
# on Python 3.11 looking a member up on an Enum class costs about 140 ns,
# ten times a global.
CONFIG, JOB, JOB_BUFFERS = Kind.CONFIG, Kind.JOB, Kind.JOB_BUFFERS
VALUE, ERROR, INIT_FAILED, BYE = Kind.VALUE, Kind.ERROR, Kind.INIT_FAILED, Kind.BYE
VALUE_BUFFERS, STARTED, READY = Kind.VALUE_BUFFERS, Kind.STARTED, Kind.READY
AREA, JOB_AREA, VALUE_AREA = Kind.AREA, Kind.JOB_AREA, Kind.VALUE_AREA

KIND_VALUES = frozenset(int(kind) for kind in Kind)

# How much either end asks of its socket per read: a small frame, or the head
# of a large one (whose payload then goes into a buffer of its own size).
RECV_SIZE = 1 << 16

# Payloads from this size on are received into a buffer of their own size.
LARGE_PAYLOAD = 1 << 16


def encode_frame(kind: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return HEADER.pack(kind, flags, len(payload)) + payload


_COUNT = struct.Struct("!I")


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


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


def check_kind(kind: int) -> None:
    if kind not in KIND_VALUES:
        raise ProtocolError(f"unknown frame kind {kind}")


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
            check_kind(kind)
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
        check_kind(kind)
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[HEADER.size : end])
        del self._buffer[:end]
        return kind, flags, payload
