"""The template's control channel and status pipes: fixed-size records.

After its handshake (a ``Config`` answered by ``Ready`` or ``InitFailed``,
through the `Connection`), the template's control channel carries records,
not frames:

Parent -> template: 9-byte records (command, sequence number).
  FORK carries two fds by SCM_RIGHTS: the write end of its status pipe, then
  the worker's end of its channel (in that order: short of fds, the kernel
  delivers only the first, and the template can still fail the request on
  its status pipe). Fork requests are numbered implicitly, 0, 1,
  2, ... in the order the template receives them; KILL names that number, so
  the template kills only a worker it has not reaped yet (never a reused pid).
  FORK's value is FORK_AHEAD for a successor prepared ahead of demand (the
  template keeps more spares while those find none), else 0.
Template -> parent, on each worker's status pipe: 9-byte records.
  PID <pid> right after the fork, then EXITED <wait status> once reaped, or
  FORK_FAILED <errno> instead of both. CEILING <bytes> comes before EXITED
  when the template killed the worker for crossing the memory ceiling.
"""

from __future__ import annotations

import struct

CONTROL_RECORD = struct.Struct("!cQ")
STATUS_RECORD = struct.Struct("!cq")

FORK = b"F"
KILL = b"K"
FORK_AHEAD = 1  # FORK's value for a worker prepared ahead of demand

PID = b"P"
EXITED = b"X"
FORK_FAILED = b"E"
CEILING = b"M"  # the template killed the worker at the memory ceiling; value: bytes used


def parse_records(data: bytes, record: struct.Struct) -> tuple[list[tuple[bytes, int]], bytes]:
    """Split ``data`` into whole records; return them and the leftover bytes."""
    whole = len(data) - len(data) % record.size
    records = [record.unpack_from(data, offset) for offset in range(0, whole, record.size)]
    return records, data[whole:]
