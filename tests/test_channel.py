"""The parent's end of a worker channel: what one job puts on the socket,
read back with the worker's side of the protocol (without a worker), and the
room its socket has (with one)."""

from __future__ import annotations

import array
import os
import socket
import threading

import pytest
import trio
import workerfns

import trio_parallel_fs as tpf
from _trio_parallel_fs_worker import _shm
from _trio_parallel_fs_worker import protocol as p
from _trio_parallel_fs_worker.protocol import descriptor as d
from trio_parallel_fs._config import WorkerConfig
from trio_parallel_fs._pool.channel import PooledWorker

SETTINGS = WorkerConfig().worker_settings()


def count_jobs_framed(connection: p.Connection, framed: list[p.Job]) -> None:
    """Record every Job the connection frames (its one door)."""
    send = connection.send

    def recording_send(event: p.Event) -> list[bytes | memoryview]:
        if isinstance(event, p.Job):
            framed.append(event)
        return send(event)

    connection.send = recording_send  # type: ignore[method-assign]


def parse(data: bytes) -> list[p.Event]:
    """What the parent sent, as the worker's Connection sees it."""
    worker = p.Connection(p.WORKER)
    worker.receive_data(data)
    events = []
    while (event := worker.next_event()) is not p.NEED_DATA:
        events.append(event)
    return events


class Reader(threading.Thread):
    """Reads the worker's end until the parent's end closes (a large job does
    not fit in a socket's buffer: it is sent while this reads), keeping the fds
    that ride along."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self.data = b""
        self.fds: list[int] = []
        self.start()

    def run(self) -> None:
        while True:
            if not hasattr(socket, "CMSG_SPACE"):  # Windows: no fds ride on a socket
                data, ancillary = self.sock.recv(1 << 20), []
            else:
                data, ancillary, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(4 * 4))
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    self.fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
            if not data:
                return
            self.data += data

    async def events_once_closed(self, worker: PooledWorker) -> list[p.Event]:
        worker.close()
        with trio.fail_after(30):
            await trio.to_thread.run_sync(self.join)
        return parse(self.data)


async def test_a_job_is_framed_once_by_the_connection_and_left_as_it_was():
    ours, theirs = socket.socketpair()
    worker = PooledWorker(ours, None, SETTINGS)  # type: ignore[arg-type]
    framed: list[p.Job] = []
    count_jobs_framed(worker.connection, framed)
    buffer = memoryview(bytearray(b"x" * 100_000))
    job = p.Job(b"the pickle", [buffer])
    reader = Reader(theirs)
    try:
        assert await worker.send_job(job)
    finally:
        events = await reader.events_once_closed(worker)
        theirs.close()
    assert framed == [job]  # the front end's event itself, framed here only
    assert job.buffers == [buffer] and job.area is None  # a resubmit sends it as it was
    config, got = events
    assert isinstance(config, p.Config) and config.settings == SETTINGS  # first, with the first job
    assert isinstance(got, p.Job) and bytes(got.pickled) == b"the pickle"
    assert [bytes(view) for view in got.buffers] == [b"x" * 100_000]
    assert reader.fds == []


@pytest.mark.skipif(_shm.unsupported_reason() is not None, reason="no shared memory area here")
async def test_the_area_path_writes_the_job_events_own_buffers_without_reframing(monkeypatch):
    """The job's buffers go into the area as the front end made them (no frame
    parsed back into a job), and the job is framed once: as an area job."""
    written = []
    write = _shm.SharedArea.write

    def recording_write(self, buffers):  # type: ignore[no-untyped-def]
        written.append(buffers)
        return write(self, buffers)

    monkeypatch.setattr(_shm.SharedArea, "write", recording_write)
    ours, theirs = socket.socketpair()
    worker = PooledWorker(ours, None, SETTINGS, area_settings=(1, 1 << 24, 60.0))  # type: ignore[arg-type]
    framed: list[p.Job] = []
    count_jobs_framed(worker.connection, framed)
    buffers = [memoryview(bytearray(b"a" * 70_000)), memoryview(bytearray(b"b" * 3))]
    job = p.Job(b"the pickle", buffers)
    reader = Reader(theirs)
    try:
        assert await worker.send_job(job)
    finally:
        events = await reader.events_once_closed(worker)
        theirs.close()
        for fd in reader.fds:
            os.close(fd)
    assert written == [buffers] and written[0] is buffers  # the event's own list of buffers
    assert len(framed) == 1 and framed[0] is not job and bytes(framed[0].pickled) == b"the pickle"
    assert job.buffers is buffers and job.area is None  # a resubmit sends it as it was
    config, area, got = events
    assert isinstance(config, p.Config) and isinstance(area, p.Area) and len(reader.fds) == 1
    assert isinstance(got, p.Job) and bytes(got.pickled) == b"the pickle" and got.buffers == []
    assert got.area is not None
    extents = d.decode_descriptor(got.area).extents
    assert [length for _, length in extents] == [70_000, 3]


async def test_a_worker_started_ahead_gets_its_config_at_once_and_once_only():
    ours, theirs = socket.socketpair()
    worker = PooledWorker(ours, None, SETTINGS)  # type: ignore[arg-type]
    try:
        worker.send_ahead()
        config = theirs.recv(1 << 16)  # sent now, before any job
        assert await worker.send_job(p.Job(b"job"))
        events = parse(config + theirs.recv(1 << 16))  # a second Config would be a ProtocolError
    finally:
        worker.close()
        theirs.close()
    assert [type(event) for event in events] == [p.Config, p.Job]
    assert worker.cwd == SETTINGS.cwd


async def test_a_workers_channel_has_room_for_more_than_a_small_message(worker_type):
    """macOS gives a Unix socket 8 KiB of buffer (the macOS view too): a job or
    reply of a few hundred KB would cross in dozens of wake-ups, and a map's
    next chunk would seldom fit to be queued. Both backends ask for Linux's
    default where a platform gives less."""
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        assert await ctx.run_sync(workerfns.add, 1, 2) == 3
        [worker] = ctx._pool._live
        channel = worker.channel
        if channel.family != getattr(socket, "AF_UNIX", None):
            pytest.skip("the loopback TCP channel (Windows): the platform sizes its buffers")
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            assert channel.getsockopt(socket.SOL_SOCKET, option) >= 65536
