"""The worker loop: receive a job, run it, send its outcome, decide whether to retire.

Runs in a process forked by the template or in a freshly spawned interpreter;
the loop is the same. It does blocking I/O on one socket around the sans-IO
`protocol.Connection`, and never imports trio.

On an AF_UNIX channel the parent may send a shared memory area (an ``Area``
frame with its fd). Jobs then may carry their buffers in it (the worker gets
views: no copy), and a result whose buffers reach the area's threshold is
written into it after the arguments. After each job the worker drops every
reference to the job and calls ``release``; if the job kept a view of an
argument, the next job would overwrite it, so the worker retires
(``Retire.AREA_HELD``).
"""

from __future__ import annotations

import array
import importlib
import inspect
import math
import os
import pickle
import random
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from . import protocol as p
from ._chunks import ITEM_INDEX, run_chunk
from ._describe import describe
from ._lifeline import flush_std_streams, keep_out_of_forks, step_aside, tighten_timers
from ._memory import MemoryWatch, memory_usage
from ._page_plan import apply_plan_while_idle, learn_before_leaving
from ._settings import PreloadError, TemplateInitError, WorkerHooks, WorkerSettings, WorkerSetupError
from ._shm import AreaMemoryError, SharedArea, total_bytes
from ._spin import WorkerSpin, input_poller, sleep_for_input, yield_cpu
from .codec import dumps_value, encode_error, loads_job

# Room for the fds one recvmsg may bring: one area, and then some, so that a
# misbehaving sender's extra fds are received (and closed), not truncated.
_FD_SPACE = socket.CMSG_SPACE(4 * array.array("i").itemsize) if hasattr(socket, "CMSG_SPACE") else 0
_RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)

class Inbox:
    """Events from the parent, read with as few syscalls as possible.

    A small job arrives whole in one ``recv``, after a ``poll`` for input.
    The poll is not there for the idle timeout only: a task asleep in a
    blocking ``recv`` on a Unix socket is also woken when the *parent reads*
    this worker's reply (the kernel announces the freed send space on the same
    wait queue, and a plain receiver's wake-up does not filter it out). That
    spurious wake-up costs a context switch per call, on the parent's CPU
    when they share one. A poller asks for input events only, and the kernel
    filters the others before waking it.

    On AF_UNIX the reads are ``recvmsg`` (the same one syscall, with room for
    ancillary data), so that the fd of a shared memory area, which rides with
    its ``Area`` frame, is received rather than dropped; it is handed out on
    that event.
    """

    def __init__(self, sock: socket.socket, connection: p.Connection) -> None:
        self.sock = sock
        self.connection = connection
        self.poll_timeout: float | None = None  # milliseconds; None: forever
        self.poller = input_poller(sock)
        self.spin = WorkerSpin(0)
        self.takes_fds = _FD_SPACE > 0 and sock.family == getattr(socket, "AF_UNIX", None)
        self.fds: list[int] = []  # received, not handed out yet

    def start_serving(self, hooks: WorkerHooks) -> None:
        """Jobs come from now on: apply the idle timeout and the busy-wait limit."""
        self.poll_timeout = None if math.isinf(hooks.idle_timeout) else hooks.idle_timeout * 1000
        self.spin = WorkerSpin(hooks.busy_wait)
        if self.spin.limit_ns:
            tighten_timers()  # its sleeps before a busy-wait must end on time

    def input_within(self, milliseconds: float) -> bool:
        """Whether a message (or part of one) waits to be read, waiting up to
        ``milliseconds`` for one."""
        return self.connection.pending > 0 or bool(self.poller(milliseconds))

    def _wait_for_input(self) -> bool:
        """Wait for the parent's next message as ``_spin`` plans it: asleep,
        then busy for a while, then asleep until it comes. False if the idle
        timeout passed first."""
        spin = self.spin
        poller = self.poller
        if not spin.limit_ns:
            return bool(poller(self.poll_timeout))
        start = time.perf_counter_ns()
        sleep, busy = spin.plan()
        timeout = self.poll_timeout
        if sleep and (timeout is None or sleep < timeout * 1e6):
            if sleep_for_input(self.sock, sleep):
                spin.waited(time.perf_counter_ns() - start)
                return True
        if busy:
            end = time.perf_counter_ns() + busy
            while not poller(0):
                if time.perf_counter_ns() >= end:
                    break
                yield_cpu()
            else:
                spin.waited(time.perf_counter_ns() - start)
                return True
        if timeout is not None:
            timeout = max(0.0, timeout - (time.perf_counter_ns() - start) / 1e6)
        if not poller(timeout):
            return False
        spin.waited(time.perf_counter_ns() - start)
        return True

    def next_event(self) -> p.Event | None:
        """The next event (`p.Closed` at EOF); None if the idle timeout passed
        with nothing received."""
        connection = self.connection
        event = connection.next_event()
        while event is p.NEED_DATA:
            if connection.pending == 0:
                # Between jobs: wait, then make the event straight from what
                # one read brings (a small job arrives whole).
                if not self._wait_for_input():
                    return None
                data = self._read()
                if data is not None:
                    event = connection.next_event_from(data)
                continue
            buffer = connection.payload_buffer()
            if buffer is None:
                data = self._read()
                if data is not None:
                    connection.receive_data(data)
            else:
                # Straight into a buffer of the payload's size: no growing
                # buffer, no copies (a 128 MB argument arrives ~3x faster).
                self._read_into(buffer)
            event = connection.next_event()
        if type(event) is p.Area:
            event.fd = self._take_fd()
        return event  # type: ignore[return-value]

    def _read(self) -> bytes | None:
        """What one read brings (b"" at the end); None if nothing came after all."""
        try:
            if self.takes_fds:
                data, ancillary, flags, _ = self.sock.recvmsg(p.RECV_SIZE, _FD_SPACE, _RECV_FLAGS)
                if ancillary:
                    self._keep_fds(ancillary, flags)
                return data
            return self.sock.recv(p.RECV_SIZE)
        except BlockingIOError:  # a spurious readiness
            return None
        except ConnectionError:
            return b""

    def _read_into(self, buffer: memoryview) -> None:
        connection = self.connection
        try:
            if self.takes_fds:
                count, ancillary, flags, _ = self.sock.recvmsg_into([buffer], _FD_SPACE, _RECV_FLAGS)
                if ancillary:
                    self._keep_fds(ancillary, flags)
                connection.received(count)
            else:
                connection.received(self.sock.recv_into(buffer))
        except BlockingIOError:  # the rest is on its way
            pass
        except ConnectionError:
            connection.receive_data(b"")

    def _keep_fds(self, ancillary: list[tuple[int, int, bytes]], flags: int) -> None:
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                self.fds.extend(fds)
        if flags & getattr(socket, "MSG_CTRUNC", 0):
            raise p.ProtocolError("the parent sent more file descriptors at once than a shared memory area needs")

    def _take_fd(self) -> int:
        if not self.fds:
            raise p.ProtocolError("an AREA frame arrived without its file descriptor; is the channel a Unix socket?")
        fd = self.fds.pop(0)
        # Any other fd is not one the protocol sends: do not keep it open.
        for extra in self.fds:
            os.close(extra)
        self.fds.clear()
        return fd


def execute(job: p.Job) -> p.Value | p.Error:
    """Run one job; its outcome as the event to send back."""
    try:
        fn, args = loads_job(job.pickled, job.buffers)
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
        return p.Error(encode_error(_unpicklable_result(fn, args, result, exc)))
    return p.Value(pickled, buffers)


def _is_chunk(fn: Any) -> bool:
    """Whether ``fn`` is `run_chunk`, or a copy of it that came by value (as
    it would if a program registered its module with
    cloudpickle.register_pickle_by_value): by module and name."""
    return (
        getattr(fn, "__module__", None) == run_chunk.__module__
        and getattr(fn, "__qualname__", None) == run_chunk.__qualname__
    )


def _unpicklable_result(fn: Any, args: Any, result: Any, exc: BaseException) -> TypeError:
    """The error of a result that would not pickle, naming what the user ran:
    for a chunk of a map (`run_chunk`), the user's function and the first item
    whose result does not pickle (its index rides as the chunk's `ITEM_INDEX`,
    which the parent turns into a note), not the chunk's internal tuple."""
    what = f"the result of {describe(fn)}, a {type(result).__qualname__},"
    if _is_chunk(fn) and type(result) is tuple and len(result) == 2 and type(result[0]) is list and len(args) == 4:
        item_fn, start, _items, _star = args
        for offset, item_result in enumerate(result[0]):
            try:
                dumps_value(item_result)
            except BaseException as item_exc:  # noqa: BLE001
                error = TypeError(
                    f"the result of {describe(item_fn)} on item {start + offset}, a "
                    f"{type(item_result).__qualname__}, could not be pickled to leave the worker: "
                    f"{type(item_exc).__name__}: {item_exc}"
                )
                setattr(error, ITEM_INDEX, start + offset)
                return error
        # Each result pickles alone, not all together (too deep, say).
        what = f"the results of {describe(item_fn)} on a chunk of items"
    return TypeError(f"{what} could not be pickled to leave the worker: {type(exc).__name__}: {exc}")


class AreaUse:
    """This worker's shared memory area, and when results go through it."""

    def __init__(self, event: p.Area) -> None:
        self.area = SharedArea.attach(event.fd, event.cap)
        self.threshold = event.threshold
        self.wrote_result = False  # the last reply's buffers are in the area

    def job_arrived(self, job: p.Job) -> p.Error | None:
        """The parent answered our last reply with this job: it has read the
        area up to its end. Resolve the job's buffers, if they are in the area.

        Returns the job's outcome if it cannot run: its arguments did not fit
        in this worker's memory (see ``_shm``'s "When the area cannot grow or
        be mapped"). The caller gets that error, and the worker lives on.
        """
        if self.wrote_result:
            self.area.peer_caught_up()
            self.wrote_result = False
        if job.area is not None:
            try:
                job.buffers = self.area.read(job.area)
            except AreaMemoryError as exc:
                return p.Error(encode_error(exc))
        return None

    def place(self, value: p.Value) -> None:
        """Put the result's buffers into the area if they are large enough and fit.

        Result buffers that go over the socket instead may be views of an
        argument (the job returned it, or a slice of it): those are copied
        first, because the area's views are released before the reply is sent.
        """
        buffers = value.buffers
        if not buffers:
            return
        if total_bytes(buffers) < self.threshold:
            pass
        elif (in_place := self.area.describe_in_place(buffers)) is not None:
            # The result is (part of) an argument, in the area already: the
            # parent lends it from there, and nothing is copied.
            value.area = in_place
            value.buffers = []
            self.wrote_result = True
            return
        elif self.area.fits(buffers):
            try:
                value.area = self.area.write(buffers)
            except OSError:
                # The area could not grow (RLIMIT_AS, RLIMIT_FSIZE): the socket
                # carries the buffers as they are, with no copy.
                pass
            else:
                value.buffers = []
                self.wrote_result = True
                return
        if self.area.holds_views:
            value.buffers = [memoryview(bytes(buffer)) for buffer in buffers]

    def release(self) -> bool:
        return self.area.release()

    def close(self) -> None:
        self.area.close()


class RetirePolicy:
    """Decides after each job whether this worker should leave."""

    def __init__(self, hooks: WorkerHooks) -> None:
        self.jobs_left: float = hooks.max_jobs or math.inf
        if hooks.max_jobs_jitter:
            # Drawn here, per worker: the random module reseeds in each fork.
            self.jobs_left += random.randint(0, hooks.max_jobs_jitter)
        self.memory = None if hooks.max_memory is None else MemoryWatch(hooks.max_memory, hooks.memory_metric)
        self.retire: Callable[[], object] = hooks.retire

    def after_job(self, area: SharedArea | None = None) -> tuple[p.Retire, bytes | None]:
        """Return the retire reason (or KEEP) and, if the retire hook raised, its
        error. The shared memory ``area``'s pages are not counted against max_memory."""
        self.jobs_left -= 1
        try:
            if self.retire():
                return p.Retire.USER, None
        except BaseException as exc:  # noqa: BLE001
            return p.Retire.HOOK_FAILED, encode_error(exc)
        if self.jobs_left <= 0:
            return p.Retire.MAX_JOBS, None
        if self.memory is not None:
            try:
                exclude = 0 if area is None else area.counted_bytes(self.memory.metric)
                exceeded = self.memory.exceeded(exclude)
            except Exception:  # noqa: BLE001 - whatever stops the measuring
                # It cannot measure itself (its job lowered RLIMIT_NOFILE, or
                # left /proc unreadable, say): the job's result goes back, and
                # the worker leaves.
                exceeded = True
            if exceeded:
                return p.Retire.MEMORY, None
        return p.KEEP, None


def load_settings(settings: WorkerSettings) -> WorkerHooks:
    """Apply the parent's working directory, sys.path and preload, then
    unpickle the hooks (in that order: unpickling a hook may import the user's
    modules)."""
    try:
        os.chdir(settings.cwd)
    except OSError as exc:
        raise WorkerSetupError(
            f"it could not enter the parent's working directory {settings.cwd!r} "
            f"({type(exc).__name__}: {exc}); was it removed?"
        ) from None
    if settings.sys_path is not None:
        sys.path[:] = settings.sys_path
    for name in settings.preload:
        try:
            importlib.import_module(name)
        except BaseException as exc:
            raise PreloadError(f"it could not preload {name!r} ({type(exc).__name__}: {exc})") from exc
    if settings.template_init is not None:
        try:
            pickle.loads(settings.template_init)()
        except BaseException as exc:
            raise TemplateInitError(f"its template_init raised {type(exc).__name__}: {exc}") from exc
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
            parts = self.connection.send(event)
            if len(parts) == 1:
                self.sock.sendall(parts[0])
                return True
            for part in parts:
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
    settings = event.settings
    assert isinstance(settings, WorkerSettings)  # the Connection checked it
    try:
        hooks = load_settings(settings)
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
    # reported as the job's, not the hook's. A worker that imported a preload
    # itself (spawned) says so too: the parent waits for that when its context
    # opens, so that a failing preload raises there, as a template's does.
    loaded_here = bool(settings.preload) or settings.template_init is not None
    if (hooks.init is not bool or baseline >= 0 or loaded_here) and not send(p.Started(baseline)):
        return 0
    # A worker prepared ahead may have time before its first job: it takes
    # the faults that job would take (see _page_plan) while no message waits.
    apply_plan_while_idle(inbox.input_within, remapped=hooks.init is not bool)
    inbox.start_serving(hooks)
    area: AreaUse | None = None
    try:
        while True:
            event = inbox.next_event()
            if event is None:
                # The parent may be sending a job right now; Bye tells it that this
                # worker left without reading it, so it can resubmit elsewhere.
                send(p.Bye())
                return 0
            if type(event) is p.Area:
                if area is not None:  # the Connection refuses a second Area
                    area.close()
                area = AreaUse(event)
                continue
            if not isinstance(event, p.Job):  # Closed
                return 0
            unable: p.Error | None = None
            if area is not None:
                unable = area.job_arrived(event)
            elif event.area is not None:  # the Connection refuses a JOB_AREA before an AREA
                raise p.ProtocolError("a job in a shared memory area this worker was never given")
            outcome = execute(event) if unable is None else unable
            del event
            held = False
            if area is not None:
                if type(outcome) is p.Value:
                    area.place(outcome)
                # Every reference the job had to its arguments is gone (or kept by it).
                held = not area.release()
            reason, hook_error = policy.after_job(None if area is None else area.area)
            if hook_error is not None:
                outcome = p.Error(hook_error)
            if held and reason is p.KEEP:
                reason = p.Retire.AREA_HELD
            outcome.retire = reason
            if not send(outcome):
                return 0
            del outcome
            if reason is not p.KEEP:
                step_aside()
                learn_before_leaving()
                return 0
    finally:
        if area is not None:
            area.close()
        for fd in inbox.fds:
            os.close(fd)


def serve_then_leave(fd: int) -> NoReturn:
    """Serve jobs on ``fd``, then leave by ``os._exit``: how every worker ends,
    forked or spawned.

    Returning would let the interpreter's shutdown join every non-daemon thread
    a job left running, so a worker told to retire could stay for as long as
    such a thread lives (forever, for a server thread), unseen by the parent.
    """
    code = 1
    keep_out_of_forks(fd)
    try:
        code = serve(socket.socket(fileno=fd))
    except ConnectionError:  # reset, broken pipe; aborted on Windows
        # The parent closed the channel while we wrote to it (a BYE racing the
        # context's close, or the parent died): it wants nothing more.
        code = 0
    except BaseException:  # noqa: BLE001 - report anything, then leave
        traceback.print_exc()
    finally:
        try:
            step_aside()
            flush_std_streams()
        finally:
            os._exit(code)  # whatever the job left in their way
