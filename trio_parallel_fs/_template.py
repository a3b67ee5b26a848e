"""The parent's side of the template: start it, ask it to fork and kill, stop it.

See ``_trio_parallel_fs_worker/_template.py`` for the template's own theory of
operation. The parent never reads the control channel after the handshake:
each fork request carries the worker's channel and a status pipe made by the
parent, so replies come back on per-worker fds and no reader task is needed.
That keeps the default context usable from any number of ``trio.run`` calls, in
any threads, at once.
"""

from __future__ import annotations

import array
import math
import os
import pickle
import select
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import trio

import _trio_parallel_fs_worker
from _trio_parallel_fs_worker import _protocol as p
from _trio_parallel_fs_worker._worker import ChannelClosed, recv_frame, send_frame

from ._errors import RemoteTraceback, TemplateStartError
from ._process import ExitInfo

# Run the child package from wherever this parent imported it, without
# touching PYTHONPATH (which the user's own subprocesses would inherit).
_CHILD_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(_trio_parallel_fs_worker.__file__)))
BOOT = (
    "import sys; sys.path.insert(0, {root!r}); "
    "from _trio_parallel_fs_worker._main import main; sys.exit(main(sys.argv[1:]))"
)

# Thread pools that numerical libraries start at import time. Capped in the
# template's environment (unless the user set them) so that the template stays
# single-threaded and N workers do not run N x cores BLAS threads.
THREAD_LIMIT_VARIABLES = (
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def child_command(role: str, fd: int, *extra: str) -> list[str]:
    return [sys.executable, "-c", BOOT.format(root=_CHILD_ROOT), role, str(fd), *extra]


def child_environment(blas_threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if blas_threads is not None:
        for name in THREAD_LIMIT_VARIABLES:
            env.setdefault(name, str(blas_threads))
    return env


def remote_error(payload: bytes) -> BaseException:
    """Rebuild an exception sent by a worker with its chain; the remote traceback
    becomes the cause of the innermost link, so printing shows it first."""
    exc_data, chain, text = pickle.loads(payload)
    try:
        exc: BaseException = pickle.loads(exc_data)
    except Exception as why:  # noqa: BLE001 - e.g. its class only exists in the worker
        first_line = text.rstrip("\n").rsplit("\n", 1)[-1]
        exc = RuntimeError(
            f"the job raised {first_line}, which could not be unpickled in the parent "
            f"({type(why).__name__}: {why}); its traceback follows"
        )
        chain = []
    link = exc
    for how, data in chain:
        try:
            inner = pickle.loads(data)
        except Exception:  # noqa: BLE001 - the traceback text still shows it
            break
        if how == "cause":
            link.__cause__ = inner
        else:
            link.__context__ = inner
        link = inner
    link.__cause__ = RemoteTraceback(text)
    return exc


class TemplateProcess:
    """One running template and the fork requests sent to it."""

    def __init__(self, setup: dict[str, Any], blas_threads: int | None) -> None:
        self._setup = setup
        self._blas_threads = blas_threads
        self._lock = threading.Lock()  # one writer at a time on the control channel
        self._next_seq = 0
        self._broken = False  # a request failed: dying, even if not reapable yet
        self._control: socket.socket | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None

    def start(self) -> None:
        """Start the template and wait until it has preloaded (blocking)."""
        ours, theirs = socket.socketpair()
        try:
            self._popen = subprocess.Popen(
                child_command("template", theirs.fileno()),
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
        self._control = ours
        self.pid = self._popen.pid
        try:
            send_frame(ours, p.CONFIG, pickle.dumps(self._setup))
            kind, _, payload = recv_frame(ours)
        except (ChannelClosed, OSError):
            code = self._popen.wait()
            self.close(0)
            raise TemplateStartError(
                f"the template process (pid {self.pid}) exited with code {code} while "
                f"preloading {self._setup['preload']}; see its output above"
            ) from None
        if kind == p.INIT_FAILED:
            cause = remote_error(payload)
            self.close(5)
            raise TemplateStartError(
                f"the template could not preload {self._setup['preload']}: "
                f"{type(cause).__name__}: {cause}"
            ) from cause

    def alive(self) -> bool:
        return not self._broken and self._popen is not None and self._popen.poll() is None

    def fork(self) -> tuple[socket.socket, ForkedWorker]:
        """Ask for a worker; its pid and exit status will arrive on its status pipe."""
        ours, theirs = socket.socketpair()
        status_r, status_w = os.pipe()
        try:
            fds = array.array("i", [theirs.fileno(), status_w])
            with self._lock:
                assert self._control is not None
                try:
                    self._control.sendmsg(
                        [p.CONTROL_RECORD.pack(p.FORK, 0)],
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

    def _done(self) -> bool:
        self._read_available()
        # The exit report is enough: EOF may come later, if a process the
        # template forked at that moment still holds a copy of the pipe.
        return self._wait_status is not None or self._fork_errno is not None or self._eof or self._status_fd is None

    def _info(self) -> ExitInfo:
        exitcode = None
        if self._wait_status is not None:
            exitcode = os.waitstatus_to_exitcode(self._wait_status)
        return ExitInfo(
            pid=self._pid,
            exitcode=exitcode,
            # EOF without an exit report: the template died before reaping.
            template_died=self._wait_status is None and self._fork_errno is None,
            ceiling_used=self._ceiling_used,
            fork_errno=self._fork_errno,
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
            await trio.lowlevel.wait_readable(self._status_fd)
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

    def release(self) -> bool:
        # The template reaps; the parent only has to stop listening.
        if self._status_fd is not None:
            os.close(self._status_fd)
            self._status_fd = None
        return True


class TemplateBackend:
    """Workers forked from one preloaded template, restarted if it dies."""

    def __init__(self, setup: dict[str, Any], blas_threads: int | None) -> None:
        self._setup = setup
        self._blas_threads = blas_threads
        self._lock = threading.Lock()
        self._template: TemplateProcess | None = None

    @property
    def template_pid(self) -> int | None:
        template = self._template
        return template.pid if template is not None else None

    async def ensure_started(self) -> None:
        template = self._template
        if template is not None and template.alive():
            return
        # The preload can take seconds; wait in a thread so the event loop runs.
        # If the caller is cancelled, the thread finishes the start for the next
        # caller. The template does not depend on this thread living: it watches
        # its control channel, not the thread that started it.
        await trio.to_thread.run_sync(self.start_blocking, abandon_on_cancel=True)

    def start_blocking(self) -> None:
        with self._lock:
            old = self._template
            if old is not None and old.alive():
                return
            if old is not None:
                old.close(1.0)
                self._template = None
            template = TemplateProcess(self._setup, self._blas_threads)
            template.start()
            self._template = template

    def start_worker(self) -> tuple[socket.socket, ForkedWorker]:
        template = self._template
        if template is None:
            raise RuntimeError("ensure_started() must come first")
        return template.fork()

    def close(self, timeout: float) -> None:
        with self._lock:
            template, self._template = self._template, None
        if template is not None:
            template.close(timeout)
