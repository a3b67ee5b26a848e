"""The parent's end of one worker: its channel, its process handle, its state.

A raw non-blocking socket, the sans-IO `_protocol.Connection` and
``trio.lowlevel.wait_readable`` are all a job round trip needs: no trio stream
objects, no extra buffering layer.

Where the OS allows (Linux: an epoll fd), the wait covers the channel *and*
the backend's exit fd (the template's status pipe, or a pidfd) at once. A
worker's death is then seen from its exit report even while another process
(a helper its job started) keeps a copy of the channel open, so no EOF comes.
Elsewhere the wait is on the channel alone.
"""

from __future__ import annotations

import select
import socket
import time

import trio

from _trio_parallel_fs_worker import _protocol as p

from ._backend import WorkerProcess
from ._lifecycle import WorkerEvent, WorkerState, next_worker_state

_RECV_SIZE = 1 << 16
_HAS_EPOLL = hasattr(select, "epoll")


class AnswerTimeout(Exception):
    """The worker's template did not confirm its start in time."""


class Worker:
    """A worker process as the pool sees it."""

    __slots__ = (
        "channel",
        "process",
        "connection",
        "state",
        "_first_frames",
        "_epoll",
        "idle_since",
        "init_done",
        "announced",
    )

    def __init__(self, channel: socket.socket, process: WorkerProcess, config_frame: bytes) -> None:
        channel.setblocking(False)
        self.channel = channel
        self.process = process
        self.connection = p.Connection(p.PARENT)
        self.state = WorkerState.STARTING
        # The worker's configuration rides along with its first job: one send.
        self._first_frames = config_frame
        self._epoll: select.epoll | None = None
        exit_fd = process.exit_fd
        if _HAS_EPOLL and exit_fd is not None:
            self._epoll = select.epoll(2)
            self._epoll.register(channel.fileno(), select.EPOLLIN)
            self._epoll.register(exit_fd, select.EPOLLIN)
        self.idle_since = time.monotonic()
        self.init_done = False  # past its init hook (a reply or Started came)
        self.announced = False  # its pid was given to the pool's observers

    def apply(self, event: WorkerEvent) -> None:
        """Move to the state the lifecycle table gives (the pool holds its lock)."""
        self.state = next_worker_state(self.state, event)

    async def send_job(self, job_parts: list[bytes | memoryview]) -> bool:
        """Send a job (its frame, in parts); False if the worker closed its end."""
        if self._first_frames:
            job_parts = [self._first_frames + job_parts[0], *job_parts[1:]]
            self._first_frames = b""
        sock = self.channel
        try:
            for part in job_parts:
                view = memoryview(part)
                sent = 0
                while sent < len(view):
                    try:
                        sent += sock.send(view[sent:])
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(sock)
        except ConnectionError:  # reset, broken pipe; aborted on Windows
            return False
        return True

    async def receive(self, answer_timeout: float) -> p.Event:
        """The worker's next event; `p.Closed` once it is known to be dead.

        Raises AnswerTimeout if the worker's start was not confirmed by its
        template within ``answer_timeout`` seconds.
        """
        connection = self.connection
        sock = self.channel
        wait_fd = self._epoll.fileno() if self._epoll is not None else sock.fileno()
        while True:
            event = connection.next_event()
            if event is not p.NEED_DATA:
                return event  # type: ignore[return-value]
            if self.process.answered():
                await trio.lowlevel.wait_readable(wait_fd)
            else:
                with trio.move_on_after(answer_timeout) as waited:
                    await trio.lowlevel.wait_readable(wait_fd)
                if waited.cancelled_caught and not self.process.answered():
                    raise AnswerTimeout
            buffer = connection.payload_buffer()
            try:
                if buffer is not None:
                    connection.received(sock.recv_into(buffer))
                else:
                    connection.receive_data(sock.recv(_RECV_SIZE))
                continue
            except BlockingIOError:
                pass
            except ConnectionError:
                connection.receive_data(b"")
                continue
            if self.process.has_exited():
                # Dead: what it sent is here already, and more never comes.
                while True:
                    try:
                        data = sock.recv(_RECV_SIZE)
                    except (BlockingIOError, ConnectionError):
                        data = b""
                    connection.receive_data(data)
                    if not data:
                        break

    def close(self) -> None:
        # EOF tells an idle worker to exit; a busy one finds out when it replies.
        self.channel.close()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
