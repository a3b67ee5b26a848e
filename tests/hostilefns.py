"""Hostile jobs for tests/test_isolation.py: each attacks the page plan its
worker and its template share (see _trio_parallel_fs_worker/_page_plan.py)
with whatever a job can reach, and says what it managed. They find the plan
as any job could: by the name of its memory file among this worker's fds and
its template's (/proc/<ppid>/fd reopens the template's file)."""

from __future__ import annotations

import fcntl
import functools
import os
import random
import signal
import struct
import time

import psutil

PLAN_NAME = "tpf-pageplan"
# The plan's layout before issue 22 (magic, version, uses, write runs, read
# runs; then (address, length) runs), which hostile writes imitate.
_OLD_MAGIC = 0x7470_6670
_OLD_HEAD = struct.Struct("=IIQII")
_RUN = struct.Struct("=QQ")


def plan_paths() -> list[str]:
    """Paths through /proc to every plan file this worker and its template hold."""
    paths = []
    for pid in ("self", str(os.getppid())):
        folder = f"/proc/{pid}/fd"
        for fd in os.listdir(folder):
            try:
                if PLAN_NAME in os.readlink(f"{folder}/{fd}"):
                    paths.append(f"{folder}/{fd}")
            except OSError:  # closed meanwhile
                pass
    return paths


def open_plans() -> list[int]:
    """The plan files, open for writing where the system lets us, else for reading."""
    fds = []
    for path in plan_paths():
        for flags in (os.O_RDWR, os.O_RDONLY):
            try:
                fds.append(os.open(path, flags))
                break
            except OSError:
                continue
    return fds


def _attempt(results: list[str], what: str, action) -> None:
    try:
        action()
        results.append(f"{what}: done")
    except OSError as exc:
        results.append(f"{what}: {exc.strerror}")


def _send_lesson(results: list[str], plan_bytes: bytes) -> None:
    """As the worker asked to learn, if this is it: send our own lesson."""
    from _trio_parallel_fs_worker import _page_plan

    # (Before issue 22 there was no such socket: every worker wrote the plan.)
    lesson = getattr(getattr(_page_plan, "_inherited", None), "lesson", None)
    if lesson is not None:
        _attempt(results, "lesson", lambda: lesson.send(plan_bytes))


def truncate_plan() -> list[str]:
    results: list[str] = []
    for fd in open_plans():
        _attempt(results, "truncate", functools.partial(os.ftruncate, fd, 0))
        os.close(fd)
    _send_lesson(results, b"")
    return results


def overwrite_plan_with_garbage() -> list[str]:
    """Random runs behind a head that passes a first look: our magic, a
    version, the uses counter at its maximum, one write run. This worker is
    kept from learning as it leaves, which would write over the garbage."""
    from _trio_parallel_fs_worker import _worker

    _worker.learn_before_leaving = lambda: None
    results: list[str] = []
    garbage = struct.pack("=IIQII", _OLD_MAGIC, 1, 2**64 - 1, 1, 0) + random.randbytes(1 << 16)
    for fd in open_plans():
        _attempt(results, "garbage", functools.partial(os.pwrite, fd, garbage, 0))
        os.close(fd)
    _send_lesson(results, random.randbytes(1 << 12))
    return results


def enlarge_plan() -> list[str]:
    """Grow the file to 1 GiB and write a plan of one 512 MiB write run: the
    whole of a mapping the template has (tests/hostile_preload.py); as the
    worker asked to learn, send that run as its lesson too."""
    import hostile_preload

    address, size = hostile_preload.ADDRESS, hostile_preload.SIZE
    results: list[str] = []
    plan = _OLD_HEAD.pack(_OLD_MAGIC, 1, 0, 1, 0) + _RUN.pack(address, size)
    for fd in open_plans():
        _attempt(results, "grow", functools.partial(os.ftruncate, fd, 1 << 30))
        _attempt(results, "write", functools.partial(os.pwrite, fd, plan, 0))
        os.close(fd)
    from _trio_parallel_fs_worker import _page_plan

    encode = getattr(_page_plan, "encode_plan", None)
    if encode is not None:
        _send_lesson(results, encode(_page_plan.Plan([(address, size)], [])))
    return results


def lock_plan_and_stop(marker: str) -> None:
    """Hold every lock a job can take on the plan files (POSIX record locks
    and flock), say so in ``marker``, then stop: a stuck or stopped sibling."""
    for fd in open_plans():
        for kind in (fcntl.LOCK_EX, fcntl.LOCK_SH):
            try:
                fcntl.lockf(fd, kind | fcntl.LOCK_NB)
                break
            except OSError:
                continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass
    with open(marker, "w") as file:
        file.write(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(3600)  # a stopped job, continued, stays stuck


def stop_while_learning() -> int:
    """Make this worker stop itself at its first read once it is learning
    the plan as it leaves (if it is asked to learn); return its pid."""
    from _trio_parallel_fs_worker import _worker

    learn = _worker.learn_before_leaving
    pread = os.pread

    def stopping_pread(*args: object) -> bytes:
        os.kill(os.getpid(), signal.SIGSTOP)
        return pread(*args)  # type: ignore[arg-type]

    def learning() -> None:
        os.pread = stopping_pread
        try:
            learn()
        finally:
            os.pread = pread

    _worker.learn_before_leaving = learning
    return os.getpid()


def own_uss() -> int:
    """This worker's private memory as its job starts (after any prefault)."""
    return int(psutil.Process().memory_full_info().uss)
