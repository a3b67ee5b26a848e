"""The parent's end of one worker's channel: send a job, receive one frame.

A raw non-blocking socket and ``trio.lowlevel.wait_readable`` are all a job
round trip needs: no trio stream objects, no extra buffering layer. The
exchange is strictly one frame out, one frame back, so no frame ever has to be
kept for later.
"""

from __future__ import annotations

import socket
import time

import trio

from _trio_parallel_fs_worker import _protocol as p

from ._process import WorkerProcess

_RECV_SIZE = 1 << 16


async def send_all(sock: socket.socket, data: bytes | memoryview) -> bool:
    """Send everything; False if the worker is gone."""
    view = memoryview(data)
    sent = 0
    try:
        while sent < len(view):
            try:
                sent += sock.send(view[sent:])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


async def receive_frame(sock: socket.socket) -> tuple[tuple[int, int, bytes] | None, bool]:
    """Receive one whole frame; None if the worker closed its end first.

    Also tells whether more bytes followed the frame. Only one thing can: a
    BYE, sent when a very short idle timeout expired right after the reply.
    """
    try:
        await trio.lowlevel.wait_readable(sock)
        data = sock.recv(_RECV_SIZE)
        while 0 < len(data) < p.HEADER.size:
            await trio.lowlevel.wait_readable(sock)
            more = sock.recv(_RECV_SIZE)
            if not more:
                return None, False
            data += more
        if not data:
            return None, False
        kind, flags, length = p.HEADER.unpack_from(data)
        end = p.HEADER.size + length
        if len(data) >= end:
            extra = data[end:]
            if extra and extra != p.encode_frame(p.BYE):
                raise p.ProtocolError(f"the worker sent {len(extra)} unexpected bytes after a reply")
            return (kind, flags, data[p.HEADER.size : end]), bool(extra)
        # A large payload: receive it straight into a buffer of its final size.
        payload = bytearray(length)
        have = len(data) - p.HEADER.size
        payload[:have] = data[p.HEADER.size :]
        view = memoryview(payload)
        while have < length:
            try:
                count = sock.recv_into(view[have:])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            if count == 0:
                return None, False
            have += count
        return (kind, flags, payload), False  # type: ignore[return-value]
    except ConnectionResetError:
        return None, False


class Worker:
    """A worker process as the pool sees it: its channel and its process handle."""

    __slots__ = ("channel", "process", "_first_frames", "idle_since", "said_bye", "served", "announced")

    def __init__(self, channel: socket.socket, process: WorkerProcess, config_frame: bytes) -> None:
        channel.setblocking(False)
        self.channel = channel
        self.process = process
        # The worker's configuration rides along with its first job: one send.
        self._first_frames = config_frame
        self.idle_since = time.monotonic()
        self.said_bye = False  # it sent BYE right after its last reply: it is gone
        self.served = 0  # replies received: 0 means it may not be past its init yet
        self.announced = False  # its pid was given to the pool's observers

    async def exchange(self, job_parts: list[bytes | memoryview]) -> tuple[int, int, bytes] | None:
        """Send a job (its frame, in parts); return the worker's reply, or None if
        it died first."""
        if self._first_frames:
            job_parts = [self._first_frames + job_parts[0], *job_parts[1:]]
            self._first_frames = b""
        for part in job_parts:
            if not await send_all(self.channel, part):
                return None
        reply, self.said_bye = await receive_frame(self.channel)
        if reply is not None:
            self.served += 1
        return reply

    def close_channel(self) -> None:
        # EOF tells an idle worker to exit; a busy one finds out when it replies.
        self.channel.close()
