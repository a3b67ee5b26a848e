"""The parent's end of one worker: its channel, its process handle, its state.

A raw non-blocking socket, the sans-IO `protocol.Connection` and
the loop's ``_loops.wait_readable`` are all a job round trip needs: no stream
objects, no extra buffering layer.

A worker's death is seen as end-of-file on its channel. Processes a job
forks (a multiprocessing helper, ``os.fork``) drop their copy of the channel
at once (an at-fork hook in the worker), and ``exec`` closes it. A fork at C
level runs no hook, but its process stays in the worker's process group,
which the template kills when it reaps the worker. One that leaves the group
(or any of a spawned worker's) keeps the channel open after the worker is
gone: so a wait through the event loop also returns once the worker's exit
is reported, which one task per run asks every quarter of a second for the
waits in progress (``wait_readable_or_gone`` in ``_loops``). (Waiting on the
channel and the exit report together, through an epoll fd, cost a fifth more
per warm call, and a timed wait before it 9 us pinned to one CPU, a sixth;
the hook and the watch cost nothing on the warm path.)

Large buffers may go through a shared memory area instead of the socket (see
``_trio_parallel_fs_worker._shm``). On a Unix socket channel each worker gets
one with its first job: an empty memfd costs a few microseconds, and a first
large result then goes through it instead of the socket. Its ``Area`` frame
and fd (SCM_RIGHTS, on the same ``sendmsg``) go right before that job's frame.
Arguments are copied in once; results are lent to the caller straight from the
area (``SharedArea.lend``): no copy out. The area places later arguments and
results around what is lent, and a job tells the worker a new window for its
results when the one it has is too small (see ``_shm``, "Results lent from
the area"). The area is closed with the worker (``close``); lent results stay
mapped until they go.

Idle areas give their memory back: a thread of this process (`_Trimmer`) trims
an area that no job has used for its context's ``shm_idle`` seconds
(default 5), keeping only the pages of lent results. The
next large transfer allocates pages again, as the first one did.
"""

from __future__ import annotations

import array
import math
import os
import socket
import threading
import time
import weakref

from _trio_parallel_fs_worker import protocol as p
from _trio_parallel_fs_worker._settings import WorkerSettings
from _trio_parallel_fs_worker._shm import SharedArea, total_bytes
from _trio_parallel_fs_worker._spin import CallerSpin, input_poller, yield_cpu

from .. import _loops
from .._backends.seam import WorkerProcess
from .lifecycle import WorkerEvent, WorkerState, next_worker_state


class _Trimmer:
    """Gives back the memory of areas idle for their idle period.

    One daemon thread per process, started with the first area. It sleeps
    until the earliest moment an area may be due, or until an area goes idle
    while it has nothing to wait for. An area is trimmed under its
    ``trim_lock`` and only while not ``busy``: the job path sets ``busy`` under
    the same lock before it writes arguments, so a trim never races a job.
    """

    def __init__(self) -> None:
        self._areas: weakref.WeakSet[SharedArea] = weakref.WeakSet()
        self._wake = threading.Condition()
        self._pid = -1
        self.waiting_forever = False

    def forked(self) -> None:
        # A child forked while the thread held the lock would wait on it
        # forever; the child's pool drops its parent's workers and areas anyway.
        self.__init__()  # type: ignore[misc]

    def watch(self, area: SharedArea) -> None:
        with self._wake:
            self._areas.add(area)
            if self._pid != os.getpid():  # first area, or a forked child: no thread yet
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="trio_parallel_fs area trimmer", daemon=True).start()
            # No wake-up: a new area is busy; it nudges the thread when it goes idle.

    def nudge(self) -> None:
        with self._wake:
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                areas = list(self._areas)
            now = time.monotonic()
            due = math.inf
            for area in areas:
                if area.closed:
                    self._areas.discard(area)
                    continue
                with area.trim_lock:
                    if area.trimmed or area.closed:
                        continue
                    if area.busy:
                        due = min(due, now + area.idle_timeout)
                    elif now >= area.idle_since + area.idle_timeout:
                        try:
                            area.trim()
                        except Exception:  # noqa: BLE001 - one area's trouble must not stop the others'
                            pass
                        area.trimmed = True
                    else:
                        due = min(due, area.idle_since + area.idle_timeout)
            with self._wake:
                self.waiting_forever = math.isinf(due)
                self._wake.wait(None if math.isinf(due) else max(0.01, due - time.monotonic()))
                self.waiting_forever = False


_trimmer = _Trimmer()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_trimmer.forked)


class AnswerTimeout(Exception):
    """The worker's template did not confirm its start in time."""


class PooledWorker:
    """A worker as the pool sees it: our end of its channel, its sans-IO
    connection, its state, and its process handle (the backend's
    `WorkerProcess`). The worker itself is the child's worker loop
    (``_trio_parallel_fs_worker._worker``)."""

    __slots__ = (
        "channel",
        "process",
        "connection",
        "state",
        "_first_frames",
        "idle_since",
        "init_done",
        "reset_seen",
        "cwd",
        "announced",
        "area",
        "_area_settings",
        "_area_wanted",
        "_spin",
        "_readable",
        "jobs_ahead",
        "_ahead_bytes",
    )

    def __init__(
        self,
        channel: socket.socket,
        process: WorkerProcess,
        settings: WorkerSettings,
        area_settings: tuple[int, int, float] | None = None,
        busy_wait: float = 0.0,
    ) -> None:
        """``area_settings``: ``(threshold, cap)`` of a shared memory area, or
        None for none (it is also none on a channel that is not a Unix socket).
        ``busy_wait``: the longest busy-wait for a reply, in seconds (see ``_spin``)."""
        channel.setblocking(False)
        self.channel = channel
        self.process = process
        self.connection = p.Connection(p.PARENT)
        self.state = WorkerState.STARTING
        # The worker's start-up message rides along with its first job: one send.
        self._first_frames = b"".join(self.connection.send(p.Config(settings)))
        self.idle_since = time.monotonic()
        self.init_done = False  # past its init hook (a reply or Started came)
        self.reset_seen = False  # a read ended in a connection reset
        self.cwd = settings.cwd  # the working directory its start-up message gives it
        self.announced = False  # its pid was given to the pool's observers
        self.area: SharedArea | None = None
        if area_settings is not None and channel.family != getattr(socket, "AF_UNIX", None):
            area_settings = None  # the loopback TCP channel cannot carry an fd
        self._area_settings = area_settings
        # Made with the first job (an empty memfd is cheap), so that a first
        # large result goes through it rather than the socket.
        self._area_wanted = area_settings is not None
        self._spin = CallerSpin(busy_wait)
        self._readable = input_poller(channel)
        self.jobs_ahead = 0  # jobs sent before the reply to the one before (`send_job_ahead`)
        self._ahead_bytes = -1  # the largest job that may go ahead (`can_send_ahead`); -1: not known yet

    def send_ahead(self) -> None:
        """Send the start-up message now, without waiting: a worker started
        ahead of demand applies its settings (its working directory among
        them) and runs its init hook while nobody waits. Whatever the socket
        does not take at once goes with the first job, as does everything if
        the worker is gone already."""
        try:
            sent = self.channel.send(self._first_frames)
        except (BlockingIOError, ConnectionError):
            return
        self._first_frames = self._first_frames[sent:]

    async def send_settings(self) -> None:
        """Send the start-up message whole, now, for a worker whose start is
        awaited before any job (`WorkerPool._start_first_worker`). If the
        worker closed its end, the next read says how it ended."""
        view = memoryview(self._first_frames)
        self._first_frames = b""
        try:
            await self._send_rest(view, 0)
        except ConnectionError:  # reset, broken pipe; aborted on Windows
            pass

    def apply(self, event: WorkerEvent) -> None:
        """Move to the state the lifecycle table gives (the pool holds its lock)."""
        self.state = next_worker_state(self.state, event)

    async def send_job(self, job: p.Job, ahead: bool = False) -> bool:
        """Send a job; False if the worker closed its end. ``job`` is not
        changed: a job that never ran goes to another worker as it is.
        ``ahead``: a job of ours is running (`send_job_ahead`)."""
        fd = -1
        area = self.area
        if area is not None:
            with area.trim_lock:  # see _Trimmer
                area.busy = True
                area.trimmed = False
        if (
            self._area_settings is not None
            and not ahead
            and (job.buffers or self._area_wanted or (area is not None and area.wants_window()))
        ):
            job_parts, fd = self._through_area(job)
        else:
            job_parts = self.connection.send(job)
        if self._first_frames:
            job_parts = [self._first_frames + job_parts[0], *job_parts[1:]]
            self._first_frames = b""
        sock = self.channel
        try:
            if fd >= 0:
                await self._send_with_fd(job_parts[0], fd)
                job_parts = job_parts[1:]
            for part in job_parts:
                view = memoryview(part)
                try:
                    sent = sock.send(view)  # a small job goes whole: no extra await
                except BlockingIOError:
                    sent = 0
                if sent < len(view):
                    await self._send_rest(view, sent)
        except ConnectionError:  # reset, broken pipe; aborted on Windows
            return False
        return True

    def can_send_ahead(self, job: p.Job) -> bool:
        """Whether ``job`` may go before the reply to the job running now
        (`send_job_ahead`): only if it would take the socket anyway, since the
        area's rules let one end write at a time (see ``_shm``: the parent
        places arguments and the worker's window by the last reply, which has
        not come); only a job that the socket's buffer takes whole while the
        worker runs the job before it: else we would wait for the worker to
        read it while it waits for us to read its reply, each blocked in
        its send; and only on a Unix socket: a worker that retires leaves
        the job unread, and a TCP channel closed with data unread resets,
        which on Windows may drop the reply before it."""
        if job.buffers:
            return False
        if self._ahead_bytes < 0:
            if self.channel.family != getattr(socket, "AF_UNIX", None):
                self._ahead_bytes = 0
            else:
                # A quarter: the kernel counts its own overhead per message
                # against the buffer too.
                self._ahead_bytes = self.channel.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 4
        if len(job.pickled) > self._ahead_bytes:
            return False
        if self._area_settings is None:
            return True
        area = self.area
        return area is not None and not area.wants_window()

    async def send_job_ahead(self, job: p.Job) -> bool:
        """`send_job`, with a job of ours still running (a map's lease, see
        ``lease``): the area stays busy until its reply too. Always by the
        socket, even if the area wants a new window since `can_send_ahead`
        looked (a lent result released meanwhile, by the garbage collector or
        another thread): placing one now could put it where the running job
        writes its result."""
        if self.area is not None:
            self.jobs_ahead += 1
        return await self.send_job(job, ahead=True)

    def _through_area(self, job: p.Job) -> tuple[list[bytes | memoryview], int]:
        """The job's frame parts, with its buffers moved into the area if they
        reach the threshold and fit; and the area's fd if its Area frame goes
        first (else -1)."""
        assert self._area_settings is not None
        threshold, cap, idle = self._area_settings
        buffers = job.buffers
        fd = -1
        area = self.area
        if area is None:
            try:
                area = SharedArea.create(cap)
            except OSError:
                # Unsupported here after all, or out of fds or memory: this
                # worker uses the socket, as it would without an area.
                self._area_settings = None
                return self.connection.send(job), -1
            self.area = area
            area.idle_timeout = idle
            area.busy = True
            _trimmer.watch(area)
            fd = area.fileno()
            first = bytes(self.connection.send(p.Area(cap, threshold))[0])
        self._area_wanted = False
        # Small buffers go into the area only to carry a new window for the
        # results (see SharedArea.wants_window); else the socket is as fast.
        large = bool(buffers) and total_bytes(buffers) >= threshold
        sent = job
        if (large or area.wants_window()) and area.fits(buffers):
            try:
                descriptor = area.write(buffers)
            except OSError:
                # The area could not grow: this process has a file-size limit
                # (RLIMIT_FSIZE: EFBIG; a memfd is a file) or an address-space
                # limit (RLIMIT_AS: ENOMEM). The socket carries this job as it is.
                pass
            else:
                sent = p.Job(job.pickled, area=descriptor)
        job_parts = self.connection.send(sent)
        if fd >= 0:
            job_parts = [first + bytes(job_parts[0]), *job_parts[1:]]
        return job_parts, fd

    async def _send_with_fd(self, part: bytes | memoryview, fd: int) -> None:
        """Send ``part``, the area's fd riding with its first byte (SCM_RIGHTS)."""
        sock = self.channel
        view = memoryview(part)
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        while True:
            try:
                sent = sock.sendmsg([view], fds)
                break
            except BlockingIOError:
                await _loops.wait_writable(sock)
        await self._send_rest(view, sent)

    async def _send_rest(self, view: memoryview, sent: int) -> None:
        """Send ``view`` from byte ``sent`` on, as the socket takes it."""
        sock = self.channel
        while sent < len(view):
            try:
                sent += sock.send(view[sent:])
            except BlockingIOError:
                await _loops.wait_writable(sock)

    async def receive(self, answer_timeout: float) -> p.Event:
        """The worker's next event; `p.Closed` once it is known to be dead.

        Raises AnswerTimeout if the worker's start was not confirmed by its
        template within ``answer_timeout`` seconds.
        """
        connection = self.connection
        sock = self.channel
        event = connection.next_event()
        while event is p.NEED_DATA:
            if self.process.answered():
                await self._wait_readable()
            else:
                with _loops.move_on_after(answer_timeout) as waited:
                    await _loops.wait_readable(sock)
                if waited.cancelled_caught and not self.process.answered():
                    raise AnswerTimeout
            buffer = connection.payload_buffer()
            try:
                if buffer is not None:
                    connection.received(sock.recv_into(buffer))
                    event = connection.next_event()
                else:
                    # A small reply arrives whole: its event straight from the bytes.
                    event = connection.next_event_from(sock.recv(p.RECV_SIZE))
                continue
            except BlockingIOError:
                pass
            except ConnectionError:
                # A reset: the worker closed with data of ours unread (see
                # WorkerPool._died for what that says on Windows).
                self.reset_seen = True
                connection.receive_data(b"")
                event = connection.next_event()
                continue
            if self.process.has_exited():
                # Dead: what it sent is here already, and more never comes.
                while True:
                    try:
                        data = sock.recv(p.RECV_SIZE)
                    except (BlockingIOError, ConnectionError):
                        data = b""
                    connection.receive_data(data)
                    if not data:
                        break
                event = connection.next_event()
        if type(event) is p.Value and (event.area is not None or event.buffers):
            self._take_result_buffers(event)
        area = self.area
        if area is not None and (type(event) is p.Value or type(event) is p.Error):
            if self.jobs_ahead:
                # The next job of ours runs now (sent ahead): the area is busy still.
                self.jobs_ahead -= 1
                return event
            # The job is over (not so after Started: it runs on): the worker
            # touches the area no more until the next job.
            area.idle_since = time.monotonic()
            area.busy = False
            if _trimmer.waiting_forever:
                _trimmer.nudge()
        return event  # type: ignore[return-value]

    async def _wait_readable(self) -> None:
        """Wait until the channel has something to read: busy at first while
        replies come quickly (see ``_spin``), letting other tasks run between
        two looks; then through the event loop.

        Also when the worker was asleep and the job wakes it: its wake-up is
        on the reply's path either way, and blocked we would add ours (the
        CPU we left halts, and waking it goes through the hypervisor).
        """
        spin = self._spin
        loop = _loops.current()  # once: the busy-wait looks again and again
        if not spin.limit_ns:
            await loop.wait_readable_or_gone(self.channel, self.process.has_exited)
            return
        start = time.perf_counter_ns()
        end = start + spin.window_ns()  # while replies come slowly: now, one look only
        readable = self._readable
        while not readable(0):
            if time.perf_counter_ns() >= end:
                await loop.wait_readable_or_gone(self.channel, self.process.has_exited)
                break
            yield_cpu()
            await loop.checkpoint()
        spin.waited(time.perf_counter_ns() - start)

    def _take_result_buffers(self, value: p.Value) -> None:
        """Borrow a result's buffers from the area; or, if large ones came over
        the socket, have the worker's window ready for the next large result."""
        if value.area is not None:
            if self.area is None:  # the Connection refuses a VALUE_AREA before an AREA
                raise p.ProtocolError("a result in a shared memory area this worker was never given")
            value.buffers = self.area.lend(value.area)
            value.area = None
        elif self.area is not None and self._area_settings is not None:
            size = total_bytes(value.buffers)
            if size >= self._area_settings[0]:
                self.area.missed(size)

    @property
    def area_size(self) -> int:
        """Bytes of memory this worker's shared memory area holds (0 without one)."""
        area = self.area
        return 0 if area is None or area.closed else area.resident_bytes()

    @property
    def lent_result_bytes(self) -> int:
        """Bytes of results lent to the caller from this worker's area, alive now."""
        area = self.area
        return 0 if area is None else area.lent_bytes

    @property
    def kept_result_bytes(self) -> int:
        """Bytes this caller keeps for this worker's next large result (0 without an area)."""
        area = self.area
        return 0 if area is None or area.closed else area.kept_bytes

    def close(self) -> None:
        # EOF tells an idle worker to exit; a busy one finds out when it replies.
        if self.area is not None:
            self.area.close()
        self.channel.close()

    def forget_after_fork(self) -> None:
        """In a child forked from the parent: close our copies of the channel
        and the area, touching nothing the parent and the worker share."""
        if self.area is not None:
            self.area.forget_after_fork()
        self.channel.close()
