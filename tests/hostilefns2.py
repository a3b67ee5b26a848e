"""Hostile jobs for tests/test_hostile_round2.py: each does to its own worker
(its fds, streams, signals, limits, pickling, process tree) what careless or
hostile code could, and the test checks that only that worker, and at most
its own call, pays for it. Importable by reference, like user code."""

from __future__ import annotations

import os
import pickle
import resource
import signal
import sys
import time


def pid() -> int:
    return os.getpid()


def pid_after(seconds: float) -> int:
    """This worker's pid, after ``seconds`` (so that concurrent calls land on
    different workers)."""
    time.sleep(seconds)
    return os.getpid()


def echo(value: object) -> object:
    return value


# --- fds ----------------------------------------------------------------------


def close_every_fd(then: str) -> None:
    """Close every fd but the standard streams, then ``return`` or ``raise``."""
    os.closerange(3, 4096)
    if then == "raise":
        raise ValueError("closed them all")


def close_every_fd_then_reuse(then: str) -> None:
    """As ``close_every_fd``, then open files until the numbers are taken
    again: whatever the worker writes next goes into one of them."""
    os.closerange(3, 4096)
    for _ in range(16):
        os.open(os.devnull, os.O_RDWR)
    if then == "raise":
        raise ValueError("closed them all")


def channel_fd() -> int:
    """The fd of this worker's channel: its one stream socket (a Unix one,
    or over the loopback channel, TCP)."""
    import socket

    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            sock = socket.socket(fileno=os.dup(fd))
            try:
                stream_families = (getattr(socket, "AF_UNIX", None), socket.AF_INET, socket.AF_INET6)
                if sock.family in stream_families and sock.type == socket.SOCK_STREAM:
                    return fd
            finally:
                sock.close()
    raise LookupError("no channel")


def dup2_over_channel(what: str) -> None:
    """Put something else on the channel's fd number: ``null`` (the null
    device) or ``socketpair`` (a socket nobody else holds, which takes the
    reply and never answers)."""
    import socket

    fd = channel_fd()
    if what in ("null", "null_sleep"):
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, fd)
        os.close(null)
        if what == "null_sleep":
            time.sleep(10)
    else:
        mine, other = socket.socketpair()
        os.dup2(mine.fileno(), fd)
        mine.close()
        other.detach()  # held, never read: the worker talks to itself


def area_fd() -> int | None:
    for name in os.listdir("/proc/self/fd"):
        try:
            if "tpf-shm" in os.readlink(f"/proc/self/fd/{name}"):
                return int(name)
        except OSError:
            continue
    return None


def swap_the_area_for_a_file(path: str, size: int) -> bool:
    """Close this worker's shared memory area's fd and put a file of
    ``size`` bytes of 0xEE on its number: a careless ``closerange`` followed
    by an ``open``. True if the worker had an area."""
    fd = area_fd()
    if fd is None:
        return False
    with open(path, "wb") as file:
        file.write(b"\xee" * size)
    replacement = os.open(path, os.O_RDWR)
    os.dup2(replacement, fd)
    os.close(replacement)
    return True


def total(array: object) -> int:
    return int(array.sum())  # type: ignore[attr-defined]


# --- standard streams ------------------------------------------------------------


def shout(megabytes: int) -> int:
    """Write ``megabytes`` MiB to fd 1 and to fd 2, then return how many."""
    chunk = b"y" * (1 << 20)
    for _ in range(megabytes):
        os.write(1, chunk)
        os.write(2, chunk)
    return megabytes


def close_standard_streams() -> int:
    os.close(1)
    os.close(2)
    return os.getpid()


def print_something() -> str:
    print("printed by a job")
    return "printed"


class _RaisingStream:
    """A stream whose flush and write raise what no stream should."""

    def write(self, text: str) -> int:
        raise RuntimeError("this stream refuses to write")

    def flush(self) -> None:
        raise RuntimeError("this stream refuses to flush")


def replace_standard_streams() -> int:
    sys.stdout = _RaisingStream()
    sys.stderr = _RaisingStream()
    return os.getpid()


# --- signals ---------------------------------------------------------------------


def ignore_signals_and(then: str) -> int:
    """Ignore SIGTERM, SIGINT and SIGHUP, restore SIGPIPE's default (which
    kills on a write to a closed socket), then ``return`` or ``spin``
    (busy, never returning)."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if then == "spin":
        while True:
            pass
    return os.getpid()


def signal_parent(signum: int) -> int:
    """Send ``signum`` to our parent (the template, or the caller for a
    spawned worker) and return our pid."""
    os.kill(os.getppid(), signum)
    return os.getpid()


def new_session() -> str:
    """What a job gets trying to leave its worker's process group."""
    try:
        os.setsid()
    except OSError as exc:
        return f"setsid: {exc.strerror}"
    return "setsid: done"


# --- forks -----------------------------------------------------------------------


def fork_a_sleeper(pid_file: str, seconds: float) -> int:
    """os.fork() a child that sleeps ``seconds`` holding every fd the worker
    had (its area, its page plan), then return the worker's pid."""
    child = os.fork()
    if child == 0:
        try:
            with open(pid_file + ".partial", "w") as file:
                file.write(str(os.getpid()))
            os.replace(pid_file + ".partial", pid_file)
            time.sleep(seconds)
        finally:
            os._exit(0)
    while not os.path.exists(pid_file):
        time.sleep(0.005)
    return os.getpid()


def fork_and_both_return(value: int) -> int:
    """os.fork() and let both return into the worker loop: the child then
    believes it is the worker, and replies."""
    os.fork()
    return value


# --- resource limits --------------------------------------------------------------


def limit_fds(count: int) -> int:
    """Lower this worker's RLIMIT_NOFILE to ``count`` (at most one fd more can open)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (count, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    return os.getpid()


def limit_processes_to_none() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    resource.setrlimit(resource.RLIMIT_NPROC, (0, hard))
    return os.getpid()


# --- pickling --------------------------------------------------------------------


def break_pickle_dumps() -> int:
    """Make the pickle module's dumps write garbage in this worker."""
    pickle.dumps = lambda *args, **kwargs: b"not a pickle"  # type: ignore[assignment]
    return os.getpid()


class ExitsWhenPickled:
    def __reduce__(self):
        raise SystemExit(7)


class InterruptsWhenUnpickled:
    """Pickles fine; unpickling raises KeyboardInterrupt (in the caller)."""

    def __reduce__(self):
        return (_interrupt, ())


def _interrupt() -> None:
    raise KeyboardInterrupt


def return_exits_when_pickled() -> ExitsWhenPickled:
    return ExitsWhenPickled()


def return_interrupts_when_unpickled() -> InterruptsWhenUnpickled:
    return InterruptsWhenUnpickled()


def return_deeply_nested(depth: int) -> list:
    nested: list = []
    for _ in range(depth):
        nested = [nested]
    return nested


class _NotesBomb(Exception):
    """An exception that cannot even be formatted: reading its notes raises."""

    def __getattribute__(self, name: str) -> object:
        if name == "__notes__":
            raise RuntimeError("no notes for you")
        return super().__getattribute__(name)


def raise_unformattable() -> None:
    raise _NotesBomb("formatted never")


# --- map ---------------------------------------------------------------------------


def generator_of(item: int):
    yield item


def unpicklable_at(bad: int, item: int) -> object:
    """``item``, except at ``bad``: a lock, which cannot be pickled."""
    import threading

    return threading.Lock() if item == bad else item


def exit_at(bad: int, item: int) -> int:
    if item == bad:
        sys.exit(5)
    return item


# --- helpers -------------------------------------------------------------------------


def wait_for_file_then_pid(path: str) -> int:
    """Block until ``path`` exists (the test's say-so), then return our pid:
    a sibling call that is certainly running throughout an attack."""
    while not os.path.exists(path):
        time.sleep(0.005)
    return os.getpid()


def ones(count: int) -> object:
    import numpy

    return numpy.ones(count)


def lie_about_the_area(how: str, count: int) -> object:
    """Return ``count`` ones, and make this worker describe the result's place
    in its area falsely: ``huge`` (an area of 1 TiB), ``past_the_file`` (an
    area as large as its cap, far past the file's end) or ``outside_the_window``
    (bytes before the window the caller gave it, where earlier results lie)."""
    import numpy

    from _trio_parallel_fs_worker import _worker
    from _trio_parallel_fs_worker.protocol.descriptor import Descriptor, decode_descriptor, encode_descriptor

    place = _worker.AreaUse.place

    def lying_place(self, value) -> None:  # type: ignore[no-untyped-def]
        place(self, value)
        _worker.AreaUse.place = place  # once
        if value.area is None:
            return
        true = decode_descriptor(value.area)
        if how == "huge":
            lie = Descriptor(1 << 40, true.extents)
        elif how == "past_the_file":
            lie = Descriptor(self.area.cap, ((self.area.cap - 4096, 4096),))
        else:
            lie = Descriptor(true.area_size, ((0, true.extents[0][1]),))
        value.area = encode_descriptor(lie)

    _worker.AreaUse.place = lying_place
    return numpy.ones(count)


def full(count: int, value: float) -> object:
    import numpy

    return numpy.full(count, value)


def forge_exit_reports() -> list[str]:
    """Open, through /proc, every pipe our template holds (the write ends of
    its workers' status pipes among them) and write a record that says the
    worker exited with SIGKILL: what each attempt got."""
    import struct

    record = struct.pack("!cq", b"X", 9)  # EXITED, killed by SIGKILL
    results = []
    folder = f"/proc/{os.getppid()}/fd"
    for name in os.listdir(folder):
        path = f"{folder}/{name}"
        try:
            target = os.readlink(path)
        except OSError:
            continue
        if not target.startswith(("pipe:", "socket:")):
            continue
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            results.append(f"{target}: {exc.strerror}")
            continue
        try:
            os.write(fd, record)
            results.append(f"{target}: written")
        except OSError as exc:
            results.append(f"{target}: {exc.strerror}")
        finally:
            os.close(fd)
    return results


def _raise_timeout(signum: int, frame: object) -> None:
    raise TimeoutError("an alarm a job left")


def leave_an_alarm(seconds: float) -> int:
    """Arm a timer whose handler raises, and return before it fires: it
    fires in the worker's own loop, waiting for the next job."""
    signal.signal(signal.SIGALRM, _raise_timeout)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    return os.getpid()


def seal_the_area(seals: int) -> str:
    """Add ``seals`` to this worker's shared memory area (any holder of a
    memfd may, unless it is sealed against sealing): what that got."""
    import fcntl

    fd = area_fd()
    if fd is None:
        return "no area"
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except OSError as exc:
        return str(exc.strerror)
    return "sealed"
