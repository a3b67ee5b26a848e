"""Where the buffers of one message lie in a shared memory area: a plain record.

The protocol carries a descriptor in a ``JOB_AREA`` or ``VALUE_AREA`` frame and
checks it (`decode_descriptor`) before handing the event out; only the shared
memory module (``_shm``) knows what an area is and reads or writes one.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# Buffers start at multiples of this, in a frame's payload and in an area:
# arrays rebuilt on them are aligned for any element type, and for the widest
# vector loads.
ALIGN = 64


class DescriptorError(ValueError):
    """A descriptor is malformed, or names bytes outside the area."""


class Descriptor(NamedTuple):
    """Where the buffers of one message lie in the area.

    Attributes:
        area_size: The bytes the writer had mapped: a reader with a smaller
            mapping maps the area again at this size before reading.
        extents: ``(offset, length)`` of each buffer, in order.
        window: For a job: ``(start, end)`` of the part of the area where the
            worker may write its results from now on (see ``_shm``, "Results
            lent from the area"); ``(0, 0)``: the worker keeps the window it had.
    """

    area_size: int
    extents: tuple[tuple[int, int], ...]
    window: tuple[int, int] = (0, 0)


# Descriptor layout, network byte order: area size (u64), buffer count (u32),
# window start and end (u64 each), then (offset u64, length u64) per buffer.
# Three buffers: 76 bytes.
_HEAD = struct.Struct("!QIQQ")
_EXTENT = struct.Struct("!QQ")


def encode_descriptor(descriptor: Descriptor) -> bytes:
    extents = descriptor.extents
    flat = [number for extent in extents for number in extent]
    start, end = descriptor.window
    return _HEAD.pack(descriptor.area_size, len(extents), start, end) + struct.pack(f"!{2 * len(extents)}Q", *flat)


def descriptor_length(data: bytes | memoryview) -> int:
    """The length of the encoded descriptor that ``data`` starts with (the
    rest of a message follows it)."""
    if len(data) < _HEAD.size:
        raise DescriptorError(f"a shared memory descriptor has at least {_HEAD.size} bytes, this one {len(data)}")
    count = _HEAD.unpack_from(data)[1]
    length: int = _HEAD.size + count * _EXTENT.size
    if length > len(data):
        raise DescriptorError(
            f"a shared memory descriptor of {count} buffers has {length} bytes, but only {len(data)} arrived"
        )
    return length


def decode_descriptor(data: bytes | memoryview) -> Descriptor:
    """The descriptor in ``data``, checked: every buffer inside the area, at an
    aligned offset, in order, none overlapping."""
    if len(data) < _HEAD.size:
        raise DescriptorError(f"a shared memory descriptor has at least {_HEAD.size} bytes, this one {len(data)}")
    area_size, count, window_start, window_end = _HEAD.unpack_from(data)
    if window_start > window_end:
        raise DescriptorError(
            f"a shared memory descriptor's window starts at {window_start}, after it ends ({window_end})"
        )
    expected = _HEAD.size + count * _EXTENT.size
    if len(data) != expected:
        raise DescriptorError(
            f"a shared memory descriptor of {count} buffers has {expected} bytes, this one {len(data)}"
        )
    flat = struct.unpack_from(f"!{2 * count}Q", data, _HEAD.size)
    extents = tuple(zip(flat[0::2], flat[1::2], strict=True))
    end = 0
    for offset, length in extents:
        if offset % ALIGN or offset < end or offset + length > area_size:
            raise DescriptorError(
                f"buffer extent (offset {offset}, length {length}) is not aligned to {ALIGN}, overlaps the "
                f"previous buffer (which ends at {end}), or passes the area's end ({area_size})"
            )
        end = offset + length
    return Descriptor(area_size, extents, (window_start, window_end))
