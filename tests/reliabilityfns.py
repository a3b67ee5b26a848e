"""Functions that test_reliability.py runs inside workers (importable by
reference, like user code): jobs that start helper processes, leave threads
behind, list their fds."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time


def write_pid(path, pid: int) -> None:
    """Write ``pid`` to ``path`` atomically: a reader never sees half of it."""
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        f.write(str(pid))
    os.replace(partial, path)


def record_init(directory) -> None:
    """An init hook: leave a file named after this worker's pid in ``directory``."""
    write_pid(os.path.join(directory, str(os.getpid())), os.getpid())


def wait_for_file(path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.005)


def fork_helper_then_die(how: str, pid_file, helper_seconds: float) -> None:
    """Fork a helper that keeps a copy of every fd (the worker's channel too)
    in a session of its own (out of reach of a kill of the worker's process
    group), then die: ``exit`` (os._exit(3)), ``SIGKILL``, or ``ceiling``
    (allocate until the memory ceiling kills us)."""
    if os.fork() == 0:
        _be_a_helper(pid_file, helper_seconds, own_session=True)
    wait_for_file(pid_file)
    if how == "exit":
        os._exit(3)
    if how == "SIGKILL":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "ceiling":
        blocks = []
        while True:
            block = bytearray(16 * 2**20)
            for offset in range(0, len(block), 4096):
                block[offset] = 1
            blocks.append(block)
            time.sleep(0.01)
    raise ValueError(f"unknown death {how!r}")


def start_sleeper(seconds: float, new_session: bool = False) -> int:
    """Start ``sleep`` and return at once, leaving it running; its pid."""
    return subprocess.Popen(["sleep", str(seconds)], start_new_session=new_session).pid


def start_sleeper_then(what: str, pid_file, seconds: float) -> None:
    """Start ``sleep``, record its pid, then ``sleep`` too or ``allocate``
    without end (for the memory ceiling)."""
    sleeper = subprocess.Popen(["sleep", str(seconds)])
    write_pid(pid_file, sleeper.pid)
    if what == "allocate":
        blocks = []
        while True:
            block = bytearray(16 * 2**20)
            for offset in range(0, len(block), 4096):
                block[offset] = 1
            blocks.append(block)
            time.sleep(0.01)
    time.sleep(seconds)


def leave_a_thread(seconds: float) -> int:
    """Start a non-daemon thread that outlives the job; our pid."""
    threading.Thread(target=time.sleep, args=(seconds,), name="left by a job").start()
    return os.getpid()


def open_fds(seconds: float = 0.0) -> tuple[int, dict[int, str]]:
    """This worker's pid and its open fds with what they point at (after
    ``seconds``, so that concurrent calls land on different workers)."""
    time.sleep(seconds)
    listing = os.listdir("/proc/self/fd")
    fds = {}
    for fd in listing:
        try:
            fds[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the listing's own fd, closed by now
            pass
    return os.getpid(), fds


def mark_sleep_and_return(marker, seconds: float, size: int) -> bytes:
    """Say we started (a file), sleep, return ``size`` bytes."""
    write_pid(marker, os.getpid())
    time.sleep(seconds)
    return b"x" * size


def cwd() -> str:
    return os.getcwd()


class ExitsInTheParent(Exception):
    """Unpickles in the worker it was raised in, raises SystemExit anywhere else."""

    def __init__(self, origin: int) -> None:
        super().__init__(origin)
        self.origin = origin

    def __reduce__(self):
        return (rebuild_or_exit, (self.origin,))


def rebuild_or_exit(origin: int) -> ExitsInTheParent:
    if os.getpid() != origin:
        raise SystemExit(9)
    return ExitsInTheParent(origin)


def raise_exits_in_the_parent() -> None:
    raise ExitsInTheParent(os.getpid())


def c_fork_helper_then_exit(pid_file, helper_seconds: float, own_session: bool) -> None:
    """Fork a helper with libc's fork(), which runs no at-fork hook: the helper
    keeps the worker's channel (as a C extension's fork would), then exit(3).
    ``own_session``: the helper leaves the worker's process group too."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).fork() == 0:
        _be_a_helper(pid_file, helper_seconds, own_session)
    wait_for_file(pid_file)
    os._exit(3)


def _be_a_helper(pid_file, seconds: float, own_session: bool) -> None:
    """In a job's forked child: say who we are, hold every inherited fd for
    ``seconds``, then leave."""
    try:
        if own_session:
            os.setsid()
        write_pid(pid_file, os.getpid())
        time.sleep(seconds)
    finally:
        os._exit(0)
