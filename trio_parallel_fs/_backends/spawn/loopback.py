"""A portable channel to a spawned worker: loopback TCP, a one-time secret, a stdin lifeline.

Windows has neither ``fork`` nor ``pass_fds``, so a spawned worker cannot
inherit its end of a socket pair. Instead, theory of operation:

1. The parent listens on 127.0.0.1, on an ephemeral port, for this one worker.
2. It starts the worker with the port on its command line and a pipe as its
   stdin, and writes a fresh 32-byte secret into that pipe. The secret never
   appears on a command line or in the environment, where other local users
   could read it.
3. The worker connects and sends the secret first. The parent compares it with
   ``hmac.compare_digest`` and drops any connection that does not present it
   in time (another local process found the port), then keeps waiting for the
   right one until an overall timeout. Once it has it, the listener is closed
   at once, and so is every other connection: nothing else can ever connect.

   Another local process can connect too and then stay silent, send a byte a
   second, or send a wrong secret. So connections are checked side by side,
   never one after another: the listener is accepted from all the while, each
   connection keeps its own deadline, and at most ``MAX_PENDING`` wait at once
   (the oldest is dropped for a newer one). Our worker sends its secret in the
   same breath as it connects, so it is let in as soon as it arrives, however
   many strangers are waiting. (Checked one at a time, with 5 s each, three
   silent strangers used to delay a worker's start by 15 s.)
4. The parent keeps the stdin pipe open for as long as the worker lives. That
   pipe is the lifeline: when the parent dies, however it dies, the OS closes
   it, and a thread in the worker that reads stdin sees end-of-file and ends
   the process, busy or not (see ``_trio_parallel_fs_worker._loopback``).

Nothing here is specific to one OS: no ``pass_fds``, no ``PR_SET_PDEATHSIG``,
no ``/proc``, no ``AF_UNIX``. The same path runs on Linux (selected with
``TRIO_PARALLEL_FS_CHANNEL=loopback``) so that CI exercises what Windows runs.

Everything here blocks; it is meant for a launcher thread (or
``trio.to_thread.run_sync``), never the Trio thread itself: waiting for the
worker to connect takes an interpreter start-up.
"""

from __future__ import annotations

import hmac
import math
import secrets
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from ..._errors import BrokenWorkerError

SECRET_SIZE = 32

# A worker sends its secret in the same breath as it connects, so it arrives
# within milliseconds; a connection silent for this long is not our worker.
# Generous anyway: on a loaded machine the worker may be descheduled between
# the two calls, and dropping it would cost a full START_TIMEOUT.
SECRET_TIMEOUT = 5.0

# Connections checked at once, at most. Each costs one fd while it waits; a
# newer one pushes the oldest out, so a flood of strangers can only drop
# strangers, or our worker if it connected and then stayed silent for as long
# as MAX_PENDING newer connections took to arrive. (Below 512, the most that
# select() watches on Windows.)
MAX_PENDING = 64

# An interpreter start plus the child package's imports. Windows runners with
# an antivirus scanning python.exe can take several seconds.
START_TIMEOUT = 60.0

# How long to wait for a killed worker to be reaped (milliseconds, normally).
KILL_TIMEOUT = 5.0

# While waiting for the connection, look this often whether the worker died
# before connecting, so that failure is reported at once, not after the timeout.
_EXIT_CHECK_INTERVAL = 0.05

PopenFactory = Callable[..., "subprocess.Popen[bytes]"]


class LoopbackWorker(NamedTuple):
    """A started worker on the loopback channel.

    Attributes:
        channel: The parent's end of the worker's channel: a connected, blocking
            TCP socket, with Nagle's algorithm off.
        popen: The worker process. ``popen.stdin`` is its lifeline: keep it open
            while the worker lives, and close it after the worker is reaped
            (closing it earlier ends the worker, mid-job if it is busy).
    """

    channel: socket.socket
    popen: subprocess.Popen[bytes]

    def discard(self) -> None:
        """End a started worker that nobody will use (its start was cancelled
        as it completed): close our end, then end it as `_end` does."""
        self.channel.close()
        _end(self.popen)


def _end(process: subprocess.Popen[bytes]) -> None:
    """Kill and reap a worker, then close its lifeline (in that order: see
    `LoopbackWorker`)."""
    process.kill()  # TerminateProcess on Windows; SIGKILL elsewhere
    try:
        process.wait(timeout=KILL_TIMEOUT)
    except subprocess.TimeoutExpired:  # stuck in the kernel: its lifeline goes all the same
        pass
    assert process.stdin is not None
    try:
        process.stdin.close()
    except OSError:  # the secret, still buffered, could not be flushed
        pass


def new_process_options() -> dict[str, Any]:
    """Popen keywords that keep Ctrl-C away from a worker: Trio handles it in
    the parent, which then cancels or kills workers as the caller asked."""
    if sys.platform == "win32":
        # A console Ctrl-C goes to every process attached to the console; a new
        # process group is left out of it (Ctrl-Break is then the only event
        # that can reach it, and nothing sends that).
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    # A new session: an interpreter still starting up would die of a terminal's
    # SIGINT before it gets to ignore it.
    return {"start_new_session": True}


class _Candidate:
    """An accepted connection that has not presented a whole secret yet."""

    __slots__ = ("conn", "deadline", "presented")

    def __init__(self, conn: socket.socket, deadline: float) -> None:
        self.conn = conn
        self.deadline = deadline
        self.presented = b""


class LoopbackListener:
    """Waits for exactly one worker to connect back with the secret it was given.

    Use ``port`` and ``secret`` to start the worker, hand it the secret on its
    stdin, then call ``accept``. ``close`` is safe to call at any time, twice.

    Args:
        secret_timeout: Seconds a connection has to present the secret before
            it is dropped; None: ``SECRET_TIMEOUT``.
        max_pending: Connections checked at once, at most (see ``MAX_PENDING``).
    """

    def __init__(self, secret_timeout: float | None = None, max_pending: int = MAX_PENDING) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, not {max_pending!r}")
        self.secret_timeout = SECRET_TIMEOUT if secret_timeout is None else secret_timeout
        self.max_pending = max_pending
        self.secret = secrets.token_bytes(SECRET_SIZE)
        self._listener: socket.socket | None = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if hasattr(socket, "SO_EXCLUSIVEADDRUSE"):
                # Windows lets another socket bind the same port with
                # SO_REUSEADDR and steal our connections, unless we forbid it.
                self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
            self._listener.bind(("127.0.0.1", 0))
            # The kernel's largest queue: strangers that connect before accept()
            # runs, or faster than it takes them, must not fill it and keep our
            # worker's connection out (a full queue drops its SYN; the retry
            # comes a second or more later).
            self._listener.listen(socket.SOMAXCONN)
            self.port: int = self._listener.getsockname()[1]
        except BaseException:
            self.close()
            raise

    @property
    def closed(self) -> bool:
        return self._listener is None

    def accept(self, popen: subprocess.Popen[bytes], timeout: float = START_TIMEOUT) -> socket.socket:
        """Return the connection that presents the secret; close the listener
        and every other connection.

        Connections that do not present the secret within ``secret_timeout``
        are dropped; they are checked side by side (see the module's theory of
        operation), so none of them delays the worker's.

        Raises:
            BrokenWorkerError: ``popen`` exited before connecting, or nothing
                presented the secret within ``timeout`` seconds. The caller
                still owns ``popen`` (to kill and reap).
        """
        listener = self._listener
        if listener is None:
            raise ValueError("this listener is closed: it accepts one worker only")
        deadline = time.monotonic() + timeout
        pending: dict[socket.socket, _Candidate] = {}  # oldest first
        selector = selectors.DefaultSelector()
        try:
            listener.setblocking(False)
            selector.register(listener, selectors.EVENT_READ)
            while True:
                if popen.poll() is not None:
                    raise BrokenWorkerError(
                        f"spawned worker process {popen.pid} exited with code {popen.returncode} "
                        "before it connected back to the parent; see its output above",
                        pid=popen.pid,
                        exitcode=popen.returncode,
                    )
                now = time.monotonic()
                for candidate in [c for c in pending.values() if c.deadline <= now]:
                    self._drop(candidate, pending, selector)
                remaining = deadline - now
                if remaining <= 0:
                    raise BrokenWorkerError(
                        f"spawned worker process {popen.pid} did not connect back to 127.0.0.1:{self.port} "
                        f"within {timeout:g} s. Is a firewall blocking loopback connections, "
                        "or is the machine overloaded?",
                        pid=popen.pid,
                    )
                wait = min([remaining, _EXIT_CHECK_INTERVAL, *(c.deadline - now for c in pending.values())])
                for key, _ in selector.select(max(wait, 0.0)):
                    if key.fileobj is listener:
                        accepted = self._accept_waiting(listener, pending, selector)
                    else:
                        accepted = self._check(pending[key.fileobj], pending, selector)  # type: ignore[index]
                    if accepted is not None:
                        accepted.setblocking(True)
                        accepted.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        return accepted
        finally:
            selector.close()
            for candidate in pending.values():
                candidate.conn.close()
            self.close()

    def _accept_waiting(
        self, listener: socket.socket, pending: dict[socket.socket, _Candidate], selector: selectors.BaseSelector
    ) -> socket.socket | None:
        """Take every connection waiting in the listener's queue; return the
        first that presents the secret at once (our worker's, as a rule)."""
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return None
            except ConnectionAbortedError:  # the stranger left before we took it
                continue
            except OSError as exc:
                # Out of fds, most likely (EMFILE): drop the oldest stranger to
                # make room, or give up if there is none to drop.
                if not pending:
                    raise BrokenWorkerError(
                        f"could not accept the spawned worker's connection on 127.0.0.1:{self.port}: "
                        f"{type(exc).__name__}: {exc}. Is this process out of file descriptors?"
                    ) from exc
                self._drop(next(iter(pending.values())), pending, selector)
                continue
            conn.setblocking(False)
            if len(pending) >= self.max_pending:
                self._drop(next(iter(pending.values())), pending, selector)
            candidate = _Candidate(conn, time.monotonic() + self.secret_timeout)
            pending[conn] = candidate
            selector.register(conn, selectors.EVENT_READ)
            # Our worker's secret is usually here already: let it in without
            # waiting for the next select().
            accepted = self._check(candidate, pending, selector)
            if accepted is not None:
                return accepted

    def _check(
        self, candidate: _Candidate, pending: dict[socket.socket, _Candidate], selector: selectors.BaseSelector
    ) -> socket.socket | None:
        """Read what ``candidate`` sent so far; return its connection if that
        is the whole secret, drop it if it is wrong or it closed."""
        conn = candidate.conn
        try:
            chunk = conn.recv(SECRET_SIZE - len(candidate.presented))
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:  # reset by the stranger
            chunk = b""
        if not chunk:
            self._drop(candidate, pending, selector)
            return None
        candidate.presented += chunk
        if len(candidate.presented) < SECRET_SIZE:
            return None  # a part of it: wait for the rest, within its deadline
        selector.unregister(conn)
        del pending[conn]
        if hmac.compare_digest(candidate.presented, self.secret):
            return conn
        conn.close()
        return None

    @staticmethod
    def _drop(
        candidate: _Candidate, pending: dict[socket.socket, _Candidate], selector: selectors.BaseSelector
    ) -> None:
        selector.unregister(candidate.conn)
        del pending[candidate.conn]
        candidate.conn.close()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None


def hand_over_secret(popen: subprocess.Popen[bytes], secret: bytes) -> None:
    """Write ``secret`` to the worker's stdin and keep the pipe open (the lifeline).

    32 bytes fit in any pipe's buffer, so this never waits for the worker.
    Raises BrokenWorkerError if the worker has already exited.
    """
    assert popen.stdin is not None, "start the worker with stdin=subprocess.PIPE"
    try:
        popen.stdin.write(secret)
        popen.stdin.flush()
    except OSError:  # BrokenPipeError; EINVAL on Windows
        popen.wait()
        raise BrokenWorkerError(
            f"spawned worker process {popen.pid} exited with code {popen.returncode} "
            "before it read its secret; see its output above",
            pid=popen.pid,
            exitcode=popen.returncode,
        ) from None


def start_loopback_worker(
    command: Callable[[int], Sequence[str]],
    env: Mapping[str, str] | None = None,
    *,
    popen: PopenFactory = subprocess.Popen,
    timeout: float = START_TIMEOUT,
) -> LoopbackWorker:
    """Start a worker and wait until it is connected on the loopback channel (blocking).

    Args:
        command: Builds the worker's command line from the port it must connect
            to (the child calls ``_trio_parallel_fs_worker._loopback.connect_to_parent``
            with it).
        env: The worker's environment; None inherits this process's.
        popen: Starts the process (``subprocess.Popen``'s signature); e.g. a
            launcher thread's ``popen``.
        timeout: Seconds to wait for the worker to connect.

    Returns:
        The connected channel and the process; see `LoopbackWorker`.

    Raises:
        BrokenWorkerError: The worker exited, or did not connect in time. It
            has been killed and reaped; nothing is left open.
        OSError: The process could not be started (nothing is left open).
    """
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    listener = LoopbackListener()
    try:
        process = popen(
            list(command(listener.port)),
            stdin=subprocess.PIPE,
            env=None if env is None else dict(env),
            close_fds=True,
            **new_process_options(),
        )
    except BaseException:
        listener.close()
        raise
    try:
        hand_over_secret(process, listener.secret)
        channel = listener.accept(process, timeout)
    except BaseException:
        listener.close()
        _end(process)
        raise
    return LoopbackWorker(channel, process)
