"""The worker loop: receive a job, run it, send its outcome, decide whether to retire.

Runs in a process forked by the template or in a freshly spawned interpreter;
the loop is the same. It uses blocking I/O on one socket and never imports trio.
"""

from __future__ import annotations

import importlib
import inspect
import math
import pickle
import random
import select
import socket
import struct
import sys
import traceback
from collections.abc import Callable
from typing import Any

import cloudpickle

from . import _protocol as p
from ._memory import MemoryWatch
from ._pickling import dumps_value, loads

_RECV_SIZE = 1 << 16
_LARGE_PAYLOAD = 1 << 20


class ChannelClosed(Exception):
    """The parent closed its end of the channel."""


class Inbox:
    """Frames from the parent, read with as few syscalls as possible.

    A small job arrives whole in one ``recv``. The idle timeout is a receive
    timeout on the socket (SO_RCVTIMEO) where the OS has one, rather than a
    poll() before each recv: one syscall instead of two, and a measurably
    quicker wake-up.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = p.FrameReader()
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

    def next_frame(self) -> tuple[int, int, bytes] | None:
        """The next frame; None if the idle timeout passed with nothing received.

        Raises ChannelClosed on EOF.
        """
        while True:
            frame = self.reader.next_frame()
            if frame is not None:
                return frame
            header = self.reader.peek_header()
            if header is not None and header[2] >= _LARGE_PAYLOAD:
                return self._receive_large(*header)
            waiting = self.reader.pending == 0
            if waiting and not self.kernel_timeout and not wait_for_job(self.sock, self.idle_timeout):
                return None
            try:
                data = self.sock.recv(_RECV_SIZE)
            except BlockingIOError:  # SO_RCVTIMEO expired
                if waiting:
                    return None
                continue  # mid-frame: the rest is on its way
            if not data:
                raise ChannelClosed
            self.reader.feed(data)


    def _receive_large(self, kind: int, flags: int, length: int) -> tuple[int, int, bytes]:
        # Straight into a buffer of the payload's size: no growing buffer, no
        # copies, no allocation per recv (a 128 MB argument arrives ~3x faster).
        start = self.reader.take_payload_start()
        payload = bytearray(length)
        payload[: len(start)] = start
        view = memoryview(payload)
        have = len(start)
        while have < length:
            try:
                count = self.sock.recv_into(view[have:])
            except BlockingIOError:  # SO_RCVTIMEO expired mid-frame: keep reading
                continue
            if count == 0:
                raise ChannelClosed
            have += count
        return kind, flags, payload  # type: ignore[return-value]


def send_frame(sock: socket.socket, kind: int, payload: bytes = b"", flags: int = 0) -> None:
    """Send one small frame (handshakes, BYE, INIT_FAILED); results go through
    ``frame_parts``, which keeps large buffers out of the copy."""
    sock.sendall(p.encode_frame(kind, payload, flags))


def recv_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    """Receive one frame, blocking; for the handshakes before the job loop."""
    frame = Inbox(sock).next_frame()
    assert frame is not None  # no timeout was set
    return frame


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


def describe(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


_MAX_CHAIN = 10


def _round_trip(obj: object) -> bytes:
    """Pickle ``obj`` and load it back once: an exception whose ``__init__`` takes
    other arguments than ``args`` pickles fine but fails to load, and the parent
    must never be the one to find that out."""
    data: bytes = cloudpickle.dumps(obj)
    pickle.loads(data)
    return data


def _chain(exc: BaseException) -> list[tuple[str, bytes]]:
    """The exceptions ``exc`` was raised from or during, each pickled on its own
    (pickle keeps neither ``__cause__`` nor ``__context__``). The chain stops at
    the first link that cannot travel."""
    links: list[tuple[str, bytes]] = []
    seen = {id(exc)}
    current = exc
    while len(links) < _MAX_CHAIN:
        if current.__cause__ is not None:
            how, nxt = "cause", current.__cause__
        elif current.__context__ is not None and not current.__suppress_context__:
            how, nxt = "context", current.__context__
        else:
            break
        if id(nxt) in seen:
            break
        seen.add(id(nxt))
        try:
            links.append((how, _round_trip(nxt)))
        except BaseException:  # noqa: BLE001 - the traceback text still shows it
            break
        current = nxt
    return links


def safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:  # noqa: BLE001 - a broken __str__ must not kill the worker
        return f"<{type(exc).__name__} whose str() failed>"


def dump_error(exc: BaseException) -> bytes:
    """Pickle an exception, its chain and its formatted traceback, whatever they hold."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        return pickle.dumps((_round_trip(exc), _chain(exc), text))
    except BaseException as why:  # noqa: BLE001 - anything the pickle machinery raises
        stand_in = RuntimeError(
            f"the job raised {type(exc).__module__}.{type(exc).__qualname__}: {safe_str(exc)}, "
            f"which could not travel back from the worker ({type(why).__name__}: {safe_str(why)}); "
            "its traceback follows. Give the exception picklable attributes and an "
            "__init__ that accepts its args, or raise a simpler one."
        )
        return pickle.dumps((pickle.dumps(stand_in), [], text))


def run_job(payload: bytes, kind: int = p.JOB) -> tuple[int, bytes, list[memoryview]]:
    """Run one pickled job; return the frame kind, pickle and buffers of its outcome."""
    try:
        if kind == p.JOB_BUFFERS:
            job_pickle, job_buffers = p.split_buffers(payload)
            fn, args = loads(job_pickle, job_buffers)
        else:
            fn, args = loads(payload)
    except BaseException as exc:  # noqa: BLE001
        return p.ERROR, dump_error(exc), []
    try:
        result = fn(*args)
    except BaseException as exc:  # noqa: BLE001 - the job's exception is its outcome
        return p.ERROR, dump_error(exc), []
    # An async function slipped through as a callable object returning a coroutine.
    if inspect.iscoroutine(result):
        result.close()
        return p.ERROR, dump_error(
            TypeError(f"{describe(fn)} returned a coroutine: it is an async function, "
                      "and run_sync runs synchronous functions only")
        ), []
    if inspect.isgenerator(result):
        result.close()
        return p.ERROR, dump_error(
            TypeError(f"{describe(fn)} returned a generator, which cannot leave the worker; "
                      "return a list (or other picklable value) instead")
        ), []
    try:
        pickled, buffers = dumps_value(result)
        return p.VALUE, pickled, buffers
    except BaseException as exc:  # noqa: BLE001
        return p.ERROR, dump_error(
            TypeError(f"the result of {describe(fn)}, a {type(result).__qualname__}, "
                      f"could not be pickled to leave the worker: {type(exc).__name__}: {exc}")
        ), []


class RetirePolicy:
    """Decides after each job whether this worker should leave."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.jobs_left: float = config.get("max_jobs") or math.inf
        jitter = config.get("max_jobs_jitter", 0)
        if jitter:
            # Drawn here, per worker: the random module reseeds in each fork.
            self.jobs_left += random.randint(0, jitter)
        max_memory = config.get("max_memory")
        self.memory = None if max_memory is None else MemoryWatch(max_memory, config.get("memory_metric", "uss"))
        self.retire: Callable[[], object] = config.get("retire", bool)

    def after_job(self) -> tuple[int, bytes | None]:
        """Return the retire reason (or KEEP) and, if the retire hook raised, its error."""
        self.jobs_left -= 1
        try:
            if self.retire():
                return p.RETIRE_USER, None
        except BaseException as exc:  # noqa: BLE001
            return p.RETIRE_HOOK_FAILED, dump_error(exc)
        if self.jobs_left <= 0:
            return p.RETIRE_MAX_JOBS, None
        if self.memory is not None and self.memory.exceeded():
            return p.RETIRE_MEMORY, None
        return p.KEEP, None


def load_settings(payload: bytes) -> dict[str, Any]:
    """Apply the parent's sys.path and preload, then unpickle the hooks (in that
    order: unpickling a hook may import the user's modules)."""
    outer = pickle.loads(payload)
    if outer["sys_path"] is not None:
        sys.path[:] = outer["sys_path"]
    for name in outer["preload"]:
        importlib.import_module(name)
    if outer["template_init"] is not None:
        pickle.loads(outer["template_init"])()
    settings: dict[str, Any] = pickle.loads(outer["hooks"])
    return settings


def serve(sock: socket.socket) -> int:
    """Serve jobs on ``sock`` until told to stop; return the exit code."""
    sock.setblocking(True)
    # One inbox for the whole conversation: the parent sends the CONFIG frame
    # and the first job together, so one recv may hold both.
    inbox = Inbox(sock)
    try:
        kind, _, payload = inbox.next_frame()  # type: ignore[misc]
    except ChannelClosed:
        return 0
    if kind != p.CONFIG:
        raise p.ProtocolError(f"expected a CONFIG frame, got kind {kind}")
    try:
        config = load_settings(payload)
        config["init"]()
    except BaseException as exc:  # noqa: BLE001 - the parent raises it for the waiting call
        send_frame(sock, p.INIT_FAILED, dump_error(exc))
        return 1
    policy = RetirePolicy(config)
    inbox.set_idle_timeout(config.get("idle_timeout", math.inf))
    while True:
        try:
            frame = inbox.next_frame()
        except ChannelClosed:
            return 0
        if frame is None:
            # The parent may be sending a job right now; BYE tells it that this
            # worker left without reading it, so it can resubmit elsewhere.
            send_frame(sock, p.BYE)
            return 0
        kind, _, payload = frame
        if kind not in (p.JOB, p.JOB_BUFFERS):
            raise p.ProtocolError(f"expected a JOB frame, got kind {kind}")
        result_kind, result, buffers = run_job(payload, kind)
        del payload, frame
        reason, hook_error = policy.after_job()
        if hook_error is not None:
            result_kind, result, buffers = p.ERROR, hook_error, []
        for part in p.frame_parts(result_kind, result, buffers, flags=reason):
            sock.sendall(part)
        del result, buffers
        if reason != p.KEEP:
            return 0
