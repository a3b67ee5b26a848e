"""The worker loop: receive a job, run it, send its outcome, decide whether to retire.

Runs in a process forked by the template or in a freshly spawned interpreter;
the loop is the same. It does blocking I/O on one socket around the sans-IO
`_protocol.Connection`, and never imports trio.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import pickle
import random
import select
import socket
import struct
import sys
from collections.abc import Callable

from . import _protocol as p
from ._describe import describe
from ._errorcodec import encode_error
from ._memory import MemoryWatch, memory_usage
from ._pickling import dumps_value, loads
from ._settings import WorkerHooks, WorkerSettings

_RECV_SIZE = 1 << 16

# The template's own handshake and rehearsal use these names.
dump_error = encode_error


class Inbox:
    """Events from the parent, read with as few syscalls as possible.

    A small job arrives whole in one ``recv``. The idle timeout is a receive
    timeout on the socket (SO_RCVTIMEO) where the OS has one, rather than a
    poll() before each recv: one syscall instead of two, and a measurably
    quicker wake-up.
    """

    def __init__(self, sock: socket.socket, connection: p.Connection) -> None:
        self.sock = sock
        self.connection = connection
        self.idle_timeout = math.inf
        self.kernel_timeout = False

    def set_idle_timeout(self, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        if not math.isinf(idle_timeout) and sys.platform.startswith("linux"):
            seconds = int(idle_timeout)
            micros = int((idle_timeout - seconds) * 1e6)
            if seconds or micros:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, micros))
                self.kernel_timeout = True

    def next_event(self) -> p.Event | None:
        """The next event (`p.Closed` at EOF); None if the idle timeout passed
        with nothing received."""
        connection = self.connection
        while True:
            event = connection.next_event()
            if event is not p.NEED_DATA:
                return event  # type: ignore[return-value]
            buffer = connection.payload_buffer()
            waiting = connection.pending == 0
            if waiting and not self.kernel_timeout and not wait_for_job(self.sock, self.idle_timeout):
                return None
            try:
                if buffer is not None:
                    # Straight into a buffer of the payload's size: no growing
                    # buffer, no copies (a 128 MB argument arrives ~3x faster).
                    connection.received(self.sock.recv_into(buffer))
                else:
                    connection.receive_data(self.sock.recv(_RECV_SIZE))
            except BlockingIOError:  # SO_RCVTIMEO expired
                if waiting:
                    return None
                # mid-frame: the rest is on its way
            except ConnectionError:
                connection.receive_data(b"")


def wait_for_job(sock: socket.socket, idle_timeout: float) -> bool:
    """Wait until the parent sends something; False if ``idle_timeout`` passed first."""
    if math.isinf(idle_timeout):
        return True
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(idle_timeout * 1000))
    readable, _, _ = select.select([sock], [], [], idle_timeout)
    return bool(readable)


def send_frame(sock: socket.socket, kind: int, payload: bytes = b"", flags: int = 0) -> None:
    """Send one small frame (the template's handshake)."""
    sock.sendall(p.encode_frame(kind, payload, flags))


def recv_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    """Receive one frame, blocking (the template's handshake)."""
    reader = p.FrameReader()
    while (frame := reader.next_frame()) is None:
        data = sock.recv(_RECV_SIZE)
        if not data:
            raise EOFError("the parent closed the channel during the handshake")
        reader.feed(data)
    kind, flags, payload = frame
    return kind, flags, bytes(payload)


def execute(job: p.Job) -> p.Value | p.Error:
    """Run one job; its outcome as the event to send back."""
    try:
        fn, args = loads(job.pickled, job.buffers)
    except BaseException as exc:  # noqa: BLE001
        return p.Error(encode_error(exc))
    try:
        result = fn(*args)
    except BaseException as exc:  # noqa: BLE001 - the job's exception is its outcome
        return p.Error(encode_error(exc))
    # An async function slipped through as a callable object returning a coroutine.
    if inspect.iscoroutine(result):
        result.close()
        return p.Error(
            encode_error(
                TypeError(
                    f"{describe(fn)} returned a coroutine: it is an async function, "
                    "and run_sync runs synchronous functions only"
                )
            )
        )
    if inspect.isgenerator(result):
        result.close()
        return p.Error(
            encode_error(
                TypeError(
                    f"{describe(fn)} returned a generator, which cannot leave the worker; "
                    "return a list (or other picklable value) instead"
                )
            )
        )
    try:
        pickled, buffers = dumps_value(result)
    except BaseException as exc:  # noqa: BLE001
        return p.Error(
            encode_error(
                TypeError(
                    f"the result of {describe(fn)}, a {type(result).__qualname__}, "
                    f"could not be pickled to leave the worker: {type(exc).__name__}: {exc}"
                )
            )
        )
    return p.Value(pickled, buffers)


def run_job(payload: bytes, kind: int = p.JOB) -> p.Value | p.Error:
    """Run one job from its frame's payload (the template's rehearsal)."""
    if kind == p.JOB_BUFFERS:
        return execute(p.Job(*p.split_buffers(payload)))
    return execute(p.Job(payload))


class RetirePolicy:
    """Decides after each job whether this worker should leave."""

    def __init__(self, hooks: WorkerHooks) -> None:
        self.jobs_left: float = hooks.max_jobs or math.inf
        if hooks.max_jobs_jitter:
            # Drawn here, per worker: the random module reseeds in each fork.
            self.jobs_left += random.randint(0, hooks.max_jobs_jitter)
        self.memory = None if hooks.max_memory is None else MemoryWatch(hooks.max_memory, hooks.memory_metric)
        self.retire: Callable[[], object] = hooks.retire

    def after_job(self) -> tuple[p.Retire, bytes | None]:
        """Return the retire reason (or KEEP) and, if the retire hook raised, its error."""
        self.jobs_left -= 1
        try:
            if self.retire():
                return p.Retire.USER, None
        except BaseException as exc:  # noqa: BLE001
            return p.Retire.HOOK_FAILED, encode_error(exc)
        if self.jobs_left <= 0:
            return p.Retire.MAX_JOBS, None
        if self.memory is not None and self.memory.exceeded():
            return p.Retire.MEMORY, None
        return p.Retire.KEEP, None


def load_settings(payload: bytes) -> WorkerHooks:
    """Apply the parent's working directory, sys.path and preload, then
    unpickle the hooks (in that order: unpickling a hook may import the user's
    modules)."""
    settings: WorkerSettings = pickle.loads(payload)
    try:
        os.chdir(settings.cwd)
    except OSError as exc:
        raise RuntimeError(
            f"the worker could not enter the parent's working directory {settings.cwd!r} "
            f"({type(exc).__name__}: {exc}); was it removed?"
        ) from None
    if settings.sys_path is not None:
        sys.path[:] = settings.sys_path
    for name in settings.preload:
        importlib.import_module(name)
    if settings.template_init is not None:
        pickle.loads(settings.template_init)()
    hooks: WorkerHooks = pickle.loads(settings.hooks)
    return hooks


class _Sender:
    """Writes events; False once the parent has closed its end (it no longer
    wants what we send, so the worker leaves quietly)."""

    def __init__(self, sock: socket.socket, connection: p.Connection) -> None:
        self.sock = sock
        self.connection = connection

    def __call__(self, event: p.Event) -> bool:
        try:
            for part in self.connection.send(event):
                self.sock.sendall(part)
        except ConnectionError:  # reset, broken pipe; aborted on Windows
            return False
        return True


def serve(sock: socket.socket) -> int:
    """Serve jobs on ``sock`` until told to stop; return the exit code."""
    sock.setblocking(True)
    connection = p.Connection(p.WORKER)
    send = _Sender(sock, connection)
    # One inbox for the whole conversation: the parent sends the Config frame
    # and the first job together, so one recv may hold both.
    inbox = Inbox(sock, connection)
    event = inbox.next_event()
    if not isinstance(event, p.Config):  # Closed: the parent left before the first job
        return 0
    try:
        hooks = load_settings(event.payload)
        hooks.init()
    except BaseException as exc:  # noqa: BLE001 - the parent raises it for the waiting call
        send(p.InitFailed(encode_error(exc)))
        return 1
    policy = RetirePolicy(hooks)
    baseline = -1
    if hooks.max_memory is not None:
        # A limit below what this worker uses before any job would retire it
        # after every job; the parent warns once with this figure.
        used = memory_usage(hooks.memory_metric)
        baseline = used if used > hooks.max_memory else -1
    # After an init hook, say it returned, so that a death from now on is
    # reported as the job's, not the hook's.
    if (hooks.init is not bool or baseline >= 0) and not send(p.Started(baseline)):
        return 0
    inbox.set_idle_timeout(hooks.idle_timeout)
    while True:
        event = inbox.next_event()
        if event is None:
            # The parent may be sending a job right now; Bye tells it that this
            # worker left without reading it, so it can resubmit elsewhere.
            send(p.Bye())
            return 0
        if not isinstance(event, p.Job):  # Closed
            return 0
        outcome = execute(event)
        del event
        reason, hook_error = policy.after_job()
        if hook_error is not None:
            outcome = p.Error(hook_error)
        outcome.retire = reason
        if not send(outcome):
            return 0
        del outcome
        if reason != p.Retire.KEEP:
            return 0
