"""The parent's side of the template: start it, ask it to fork and kill, stop it.

See ``_trio_parallel_fs_worker/_template.py`` for the template's own theory of
operation. The parent never reads the control channel after the handshake:
each fork request carries the worker's channel and a status pipe made by the
parent, so replies come back on per-worker fds and no reader task is needed.
That keeps the default context usable from any number of ``trio.run`` calls, in
any threads, at once.

A template that stops answering (SIGSTOPped, hung) is noticed by the pool:
a fork request or a kill it does not answer within `ANSWER_TIMEOUT` makes the
pool `give_up` on it, which kills it; the next call starts a new one.
"""

from __future__ import annotations

import array
import errno
import math
import os
import select
import socket
import subprocess
import threading
import time

from _trio_parallel_fs_worker import protocol as p
from _trio_parallel_fs_worker._settings import TemplateSettings
from _trio_parallel_fs_worker.codec import decode_error

from .. import _loops
from .._errors import template_start_error
from .launch import channel_pair, child_command, child_environment
from .seam import ANSWER_TIMEOUT, ExitInfo


def _handshake(sock: socket.socket, settings: TemplateSettings) -> p.Event:
    """Send the template its settings; return its answer (blocking)."""
    connection = p.Connection(p.PARENT, p.TEMPLATE)
    for part in connection.send(p.Config(settings)):
        sock.sendall(part)
    while True:
        event = connection.next_event()
        if event is not p.NEED_DATA:
            return event  # type: ignore[return-value]
        try:
            connection.receive_data(sock.recv(p.RECV_SIZE))
        except OSError:
            connection.receive_data(b"")


class TemplateProcess:
    """One running template and the fork requests sent to it."""

    def __init__(self, settings: TemplateSettings, blas_threads: int | None) -> None:
        self._settings = settings
        self._blas_threads = blas_threads
        self._lock = threading.Lock()  # one writer at a time on the control channel
        self._next_seq = 0
        self._broken = False  # a request failed, or it stopped answering: dying
        self._aborted = False  # closed while starting: kill it, whenever it exists
        self._control: socket.socket | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None

    def start(self) -> None:
        """Start the template and wait until it has preloaded (blocking)."""
        ours, theirs = socket.socketpair()
        try:
            self._popen = subprocess.Popen(
                child_command("template", str(theirs.fileno())),
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=child_environment(self._blas_threads),
                # Its own session: Ctrl-C at a terminal signals the foreground
                # process group, and an interpreter still starting up would die
                # of it before it gets to ignore SIGINT.
                start_new_session=True,
            )
        finally:
            theirs.close()
        if self._aborted:
            self._popen.kill()  # abort() ran before there was a process to kill
        self._control = ours
        self.pid = self._popen.pid
        answer = _handshake(ours, self._settings)
        if isinstance(answer, p.Ready):
            return
        if isinstance(answer, p.InitFailed):
            error = template_start_error(self._settings.preload, cause=decode_error(answer.payload))
            self.close(5)
            raise error from error.__cause__
        code = self._popen.wait()
        self.close(0)
        if self._aborted:
            raise BrokenPipeError("this worker context is closed")  # abort() killed it: not a failed preload
        raise template_start_error(self._settings.preload, pid=self.pid, exitcode=code) from None

    def alive(self) -> bool:
        return not self._broken and self._popen is not None and self._popen.poll() is None

    def fork(self, ahead: bool = False) -> tuple[socket.socket, ForkedWorker]:
        """Ask for a worker; its pid and exit status will arrive on its status pipe.
        ``ahead``: it is prepared ahead of demand (see the template's spares)."""
        ours, theirs = channel_pair()
        # The "status pipe" is a socketpair: any process of this user (a job
        # of a sibling worker, through /proc/<template>/fd) can open a pipe
        # again and write to it, and a forged exit report would fail this
        # worker's call. A socket cannot be opened that way.
        status_r, status_w = (end.detach() for end in socket.socketpair())
        try:
            # The status pipe first: out of fds, the template receives only the
            # first, and can still say why it fails the request.
            fds = array.array("i", [status_w, theirs.fileno()])
            with self._lock:
                if self._control is None:
                    raise BrokenPipeError("the template was closed")
                try:
                    self._control.sendmsg(
                        [p.CONTROL_RECORD.pack(p.FORK, p.FORK_AHEAD if ahead else 0)],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())],
                    )
                except OSError:
                    # The template closed its end: it is dying, although for an
                    # instant the kernel may not let us reap it yet.
                    self._broken = True
                    raise
                seq = self._next_seq
                self._next_seq += 1
        except BaseException:
            ours.close()
            os.close(status_r)
            raise
        finally:
            theirs.close()
            os.close(status_w)
        return ours, ForkedWorker(self, seq, status_r)

    def kill(self, seq: int) -> None:
        with self._lock:
            if self._control is None:
                return
            try:
                self._control.sendall(p.CONTROL_RECORD.pack(p.KILL, seq))
            except OSError:
                pass  # the template is gone, and its workers with it

    def abort(self) -> None:
        """Closed while it starts (another thread waits in `start`): kill it
        now rather than wait for a preload that may take seconds. Nothing was
        forked from it yet; the waiting `start` meets the end of its channel."""
        self._aborted = True
        if self._popen is not None:
            self._popen.kill()

    def give_up(self) -> None:
        """It stopped answering: kill it (its workers die with it) and never
        use it again. Only the parent reaps it, so its pid is still ours."""
        self._broken = True
        if self._popen is not None and self._popen.returncode is None:
            try:
                self._popen.kill()
            except ProcessLookupError:
                pass

    def close(self, timeout: float) -> None:
        """EOF on the control channel: the template kills its workers and exits."""
        with self._lock:
            if self._control is not None:
                self._control.close()
                self._control = None
        if self._popen is not None:
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait()

    def forget(self) -> None:
        """In a forked child of the parent: close our copies of its fds, nothing else."""
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._popen is not None:
            self._popen.returncode = 0  # not ours to reap: keep Popen from trying
            self._popen = None


class ForkedWorker:
    """A worker forked by the template, known to the parent by its status pipe."""

    def __init__(self, template: TemplateProcess, seq: int, status_fd: int) -> None:
        self._template = template
        self._seq = seq
        self._status_fd: int | None = status_fd
        os.set_blocking(status_fd, False)
        self._buffer = b""
        self._pid: int | None = None
        self._wait_status: int | None = None
        self._ceiling_used: int | None = None
        self._fork_errno: int | None = None
        self._unresponsive: float | None = None
        self._eof = False

    def _read_available(self) -> None:
        while self._status_fd is not None and not self._eof:
            try:
                data = os.read(self._status_fd, 512)
            except BlockingIOError:
                return
            if not data:
                self._eof = True
                return
            records, self._buffer = p.parse_records(self._buffer + data, p.STATUS_RECORD)
            for tag, value in records:
                if tag == p.PID:
                    self._pid = value
                elif tag == p.EXITED:
                    self._wait_status = value
                elif tag == p.CEILING:
                    self._ceiling_used = value
                elif tag == p.FORK_FAILED:
                    self._fork_errno = value

    @property
    def pid(self) -> int | None:
        if self._pid is None:
            self._read_available()
        return self._pid

    def answered(self) -> bool:
        return self.pid is not None or self._done()

    def give_up(self) -> ExitInfo:
        self._template.give_up()
        self._unresponsive = ANSWER_TIMEOUT
        return self._info()

    def _done(self) -> bool:
        self._read_available()
        # The exit report is enough: EOF may come later, if a process the
        # template forked at that moment still holds a copy of the pipe.
        return (
            self._wait_status is not None
            or self._fork_errno is not None
            or self._eof
            or self._unresponsive is not None
            or self._status_fd is None
        )

    def _info(self) -> ExitInfo:
        exitcode = None
        if self._wait_status is not None:
            exitcode = os.waitstatus_to_exitcode(self._wait_status)
        fork_errno = self._fork_errno
        if self._eof and self._pid is None and fork_errno is None and self._template.alive():
            # The status pipe closed unused while the template lives: the
            # request's fds never reached it (the kernel drops fds that a
            # process out of file descriptors cannot take).
            fork_errno = errno.EMFILE
        return ExitInfo(
            pid=self._pid,
            exitcode=exitcode,
            # EOF without an exit report: the template died before reaping.
            template_died=self._wait_status is None and fork_errno is None,
            ceiling_used=self._ceiling_used,
            fork_errno=fork_errno,
            unresponsive=self._unresponsive,
        )

    def kill(self) -> None:
        self._template.kill(self._seq)

    def has_exited(self) -> bool:
        # A plain non-blocking read, not a cached select.poll object: several
        # threads' trio.run may check the same idle worker at once, and a poll
        # object refuses concurrent use ("concurrent poll() invocation").
        return self._done()

    def exited_cleanly(self) -> bool:
        return self._wait_status is not None and os.waitstatus_to_exitcode(self._wait_status) == 0

    async def wait(self) -> ExitInfo:
        while not self._done():
            assert self._status_fd is not None
            await _loops.wait_readable(self._status_fd)
        return self._info()

    def wait_blocking(self, timeout: float) -> ExitInfo | None:
        deadline = time.monotonic() + timeout
        while not self._done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            assert self._status_fd is not None
            select.select([self._status_fd], [], [], None if math.isinf(remaining) else remaining)
        return self._info()

    def forget(self) -> None:
        self.release()

    def release(self) -> bool:
        # The template reaps; the parent only has to stop listening.
        if self._status_fd is not None:
            os.close(self._status_fd)
            self._status_fd = None
        return True


class TemplateBackend:
    """Workers forked from one preloaded template, restarted if it dies."""

    def __init__(self, settings: TemplateSettings, blas_threads: int | None) -> None:
        self._settings = settings
        self._blas_threads = blas_threads
        self._lock = threading.Lock()
        self._template: TemplateProcess | None = None
        self._starting: TemplateProcess | None = None  # one in its start-up, for close()
        self._closed = False

    @property
    def template_pid(self) -> int | None:
        template = self._template
        return template.pid if template is not None else None

    async def start(self) -> None:
        template = self._template
        if template is not None and template.alive():
            return
        # The preload can take seconds; wait in a thread so the event loop runs.
        # If the caller is cancelled, the thread finishes the start for the next
        # caller. The template does not depend on this thread living: it watches
        # its control channel, not the thread that started it.
        await _loops.to_thread_run_sync(self.start_blocking, abandon_on_cancel=True)

    def start_blocking(self) -> None:
        with self._lock:
            if self._closed:
                # A close ran meanwhile: a template started now would be one
                # that nothing closes.
                raise BrokenPipeError("this worker context is closed")
            old = self._template
            if old is not None and old.alive():
                return
            if old is not None:
                old.close(1.0)
                self._template = None
            template = TemplateProcess(self._settings, self._blas_threads)
            # Published before _closed is read again: either close() sees it
            # and aborts it, or this sees the close and starts nothing.
            self._starting = template
            try:
                if self._closed:
                    raise BrokenPipeError("this worker context is closed")
                template.start()
            finally:
                self._starting = None
            self._template = template

    async def start_worker(self) -> tuple[socket.socket, ForkedWorker]:
        template = self._template
        if template is None:
            raise BrokenPipeError("start() must come first")
        return template.fork()

    def start_worker_now(self) -> tuple[socket.socket, ForkedWorker] | None:
        template = self._template
        if template is None or not template.alive():
            return None
        try:
            return template.fork(ahead=True)
        except OSError:
            return None  # dying: the next call starts a new template

    def close(self, timeout: float) -> None:
        # Said before taking the lock, which a start in progress holds for as
        # long as the preload takes (seconds, for a heavy one): Ctrl-C or a
        # cancelled first call closes at once rather than after the preload.
        self._closed = True
        starting = self._starting
        if starting is not None:
            starting.abort()
        with self._lock:
            template, self._template = self._template, None
        if template is not None:
            template.close(timeout)

    def forget_after_fork(self) -> None:
        # The lock may have been held by another thread at the fork: a new one.
        self._lock = threading.Lock()
        template, self._template = self._template, None
        if template is not None:
            template.forget()
