"""The wire protocol between the parent and a worker, without any I/O.

Every message is a *frame*: a 10-byte header (kind, flags, payload length)
followed by the payload. Both ends use the same two pure pieces below:
``encode_frame`` to build bytes and ``FrameReader`` to cut a byte stream back
into frames. The I/O around them differs (blocking in the worker, Trio in the
parent), so it lives with each side.

Conversation on one worker channel::

    parent                          worker
    CONFIG (first frame only)  ->
                               <-   INIT_FAILED (init raised; worker exits)
    JOB                        ->
                               <-   VALUE | ERROR   (flags: retire reason)
    (JOB_BUFFERS and VALUE_BUFFERS: the same, carrying large buffers apart
    from the pickle, pickle protocol 5 style, so they are never copied into it)
                               <-   BYE             (idle timeout; worker exits)
    EOF                        ->   worker exits cleanly

A worker that retires says so in the flags of its last result, so the parent
never sends another job to a worker that is leaving.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("!BBQ")

# Frame kinds, parent -> worker.
CONFIG = 1
JOB = 2
JOB_BUFFERS = 3
# Frame kinds, worker -> parent.
VALUE = 10
ERROR = 11
INIT_FAILED = 12
BYE = 13
VALUE_BUFFERS = 14

_WITH_BUFFERS = {JOB: JOB_BUFFERS, VALUE: VALUE_BUFFERS}

# Retire reasons, carried in the flags of a VALUE or ERROR frame.
KEEP = 0
RETIRE_MAX_JOBS = 1
RETIRE_MEMORY = 2
RETIRE_USER = 3
RETIRE_HOOK_FAILED = 4  # the payload then holds the retire hook's error

RETIRE_REASONS = {
    RETIRE_MAX_JOBS: "jobs",
    RETIRE_MEMORY: "memory",
    RETIRE_USER: "user",
    RETIRE_HOOK_FAILED: "hook_error",
}

_KINDS = {CONFIG, JOB, JOB_BUFFERS, VALUE, ERROR, INIT_FAILED, BYE, VALUE_BUFFERS}
_COUNT = struct.Struct("!I")


class ProtocolError(Exception):
    """The byte stream does not hold valid frames."""


def encode_frame(kind: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return HEADER.pack(kind, flags, len(payload)) + payload


def encode_header(kind: int, length: int, flags: int = 0) -> bytes:
    return HEADER.pack(kind, flags, length)


# Buffers start at multiples of this within the payload, so that arrays
# rebuilt on the receiver's buffer are aligned for their element type.
_ALIGN = 64


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


def frame_parts(kind: int, pickled: bytes, buffers: list[memoryview], flags: int = 0) -> list[bytes | memoryview]:
    """The pieces of one frame, to be sent in order; large buffers are sent as
    they are (no copy). With buffers, ``kind`` becomes its _BUFFERS variant and
    the payload is: buffer count, the pickle's and each buffer's length, the
    pickle, then each buffer at an aligned offset (zero padding between)."""
    if not buffers:
        return [encode_frame(kind, pickled, flags)]
    lengths = [len(pickled)] + [buffer.nbytes for buffer in buffers]
    meta = _COUNT.pack(len(buffers)) + struct.pack(f"!{len(lengths)}Q", *lengths)
    head = meta + pickled
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
    return [encode_header(_WITH_BUFFERS[kind], offset, flags) + head, *parts]


def split_buffers(payload: bytes) -> tuple[memoryview, list[memoryview]]:
    """The pickle and the buffers of a _BUFFERS payload, as views (no copy of a
    large payload, which arrives in a bytearray: arrays rebuilt on it are
    writable, as they would be from an in-band pickle)."""
    if isinstance(payload, bytes):
        payload = bytearray(payload)  # type: ignore[assignment]
    view = memoryview(payload)
    (count,) = _COUNT.unpack_from(view)
    lengths = struct.unpack_from(f"!{count + 1}Q", view, _COUNT.size)
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
    """Accumulates bytes and yields complete frames, in order."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def pending(self) -> int:
        """Bytes received that do not make a whole frame yet."""
        return len(self._buffer)

    def peek_header(self) -> tuple[int, int, int] | None:
        """``(kind, flags, payload length)`` of the frame being read, once known."""
        if len(self._buffer) < HEADER.size:
            return None
        kind, flags, length = HEADER.unpack_from(self._buffer)
        return kind, flags, length

    def take_payload_start(self) -> bytes:
        """Drop the header of the frame being read and return the payload bytes
        received so far: for a caller that reads the rest straight into a buffer
        of the payload's size (only valid while the frame is incomplete)."""
        start = bytes(self._buffer[HEADER.size :])
        self._buffer.clear()
        return start

    def next_frame(self) -> tuple[int, int, bytes] | None:
        """Return ``(kind, flags, payload)`` or None if no whole frame is buffered."""
        if len(self._buffer) < HEADER.size:
            return None
        kind, flags, length = HEADER.unpack_from(self._buffer)
        if kind not in _KINDS:
            raise ProtocolError(f"unknown frame kind {kind}")
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[HEADER.size : end])
        del self._buffer[:end]
        return kind, flags, payload


# --- The template's control channel and status pipes -----------------------
#
# Parent -> template: fixed 9-byte records (command, sequence number).
#   FORK carries two fds by SCM_RIGHTS: the worker's end of its channel and the
#   write end of its status pipe. Fork requests are numbered implicitly, 0, 1,
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
