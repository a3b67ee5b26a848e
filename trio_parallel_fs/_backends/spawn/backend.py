"""The spawn backend: each worker is a fresh interpreter, the parent's own child.

This is the only backend on Windows (no fork) and the slow path everywhere:
every worker pays an interpreter start and its imports. It runs the same worker
loop and wire protocol as the template's workers, and is tested on Linux too,
over both channels: a socketpair passed with ``pass_fds`` (POSIX), and the
portable loopback channel of ``loopback`` (Windows; Linux CI runs it with
TRIO_PARALLEL_FS_CHANNEL=loopback). ``memory_ceiling`` is enforced by a
watcher thread in the parent (``ceiling``), since there is no template.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from ... import _loops
from ..launch import channel_pair, child_command, child_environment
from ..seam import ExitInfo
from .ceiling import CeilingWatcher, Watched
from .loopback import LoopbackWorker, start_loopback_worker

_HAS_PIDFD = hasattr(os, "pidfd_open")


class _Launcher:
    """Starts spawned workers from one long-lived thread.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not
    the process. Calls come from whichever thread runs ``trio.run``, and such a
    thread may end long before the process (a busy worker would then be killed,
    or, without the signal, outlive a dead parent by its job's duration). This
    thread lives as long as the process, so every spawned worker gets the
    signal, tied to the right lifetime.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._owner_pid = 0
        self._requests: queue.SimpleQueue[tuple[list[str], dict[str, Any], concurrent.futures.Future[Any]]]
        self._requests = queue.SimpleQueue()

    def popen(self, command: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        with self._lock:
            # After a fork of the parent, the thread is gone from the child.
            if self._thread is None or not self._thread.is_alive() or self._owner_pid != os.getpid():
                self._requests = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=self._serve, args=(self._requests,), name="trio_parallel_fs spawn launcher", daemon=True
                )
                self._thread.start()
                self._owner_pid = os.getpid()
            done: concurrent.futures.Future[subprocess.Popen[bytes]] = concurrent.futures.Future()
            self._requests.put((command, kwargs, done))
        return done.result()

    @staticmethod
    def _serve(requests: queue.SimpleQueue[tuple[list[str], dict[str, Any], concurrent.futures.Future[Any]]]) -> None:
        while True:
            command, kwargs, done = requests.get()
            try:
                done.set_result(subprocess.Popen(command, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                done.set_exception(exc)


_launcher = _Launcher()


def channel_kind() -> str:
    """How spawned workers get their channel: ``"socketpair"`` (POSIX: one end
    passed with ``pass_fds``) or ``"loopback"`` (Windows always; elsewhere when
    TRIO_PARALLEL_FS_CHANNEL=loopback, so that Linux CI runs the Windows path)."""
    if sys.platform == "win32":
        return "loopback"
    choice = os.environ.get("TRIO_PARALLEL_FS_CHANNEL", "socketpair")
    if choice not in ("socketpair", "loopback"):
        raise ValueError(f"TRIO_PARALLEL_FS_CHANNEL must be 'socketpair' or 'loopback', not {choice!r}")
    return choice


# waitid(WNOWAIT) sees an exit without reaping; Windows and macOS before
# Python 3.13 lack it, and then the group kill at exit is skipped.
_HAS_WAITID = hasattr(os, "waitid") and hasattr(os, "WNOWAIT")
_HAS_GROUPS = hasattr(os, "killpg")


class SpawnedWorker:
    """A spawned worker: the parent's own child, leading its own process group
    (it starts in its own session; on Windows, its own process group), so that
    killing the group takes the processes its jobs started along."""

    def __init__(self, popen: subprocess.Popen[bytes], watcher: CeilingWatcher | None = None) -> None:
        self._popen = popen
        self._pidfd: int | None = None
        if _HAS_PIDFD:
            try:
                self._pidfd = os.pidfd_open(popen.pid)
            except OSError:  # old kernel
                self._pidfd = None
        self._watcher = watcher
        self._watched: Watched | None = watcher.watch(popen.pid, self.kill) if watcher is not None else None

    @property
    def pid(self) -> int:
        return self._popen.pid

    def answered(self) -> bool:
        return True

    def give_up(self) -> ExitInfo:
        self.kill()
        return self._info()

    def _kill_group(self) -> None:
        # Only while the worker is not reaped: until then its pid (and so the
        # group id it gave its group) cannot belong to anyone else.
        if not _HAS_GROUPS:
            return
        try:
            os.killpg(self._popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        if self._popen.returncode is not None:
            return
        if _HAS_GROUPS:
            self._kill_group()
        else:
            self._popen.kill()  # Windows: TerminateProcess through its handle

    def _exited_unreaped(self) -> bool:
        """Exited (a zombie), without reaping it where the OS allows."""
        if self._popen.returncode is not None:
            return True
        if not _HAS_WAITID:
            return self._popen.poll() is not None
        try:
            info = os.waitid(os.P_PID, self._popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def _reap(self) -> bool:
        """Reap it if it exited, after killing what is left of its process group
        (a job's helpers must not outlive the worker)."""
        if self._popen.returncode is not None:
            return True
        if not self._exited_unreaped():
            return False
        if self._popen.returncode is None:
            self._kill_group()
            self._popen.wait()
        return True

    def has_exited(self) -> bool:
        return self._reap()

    def exited_cleanly(self) -> bool:
        return self._popen.returncode == 0

    def _info(self) -> ExitInfo:
        used = self._watched.used if self._watched is not None else None
        return ExitInfo(pid=self._popen.pid, exitcode=self._popen.returncode, ceiling_used=used)

    async def wait(self) -> ExitInfo:
        if self._pidfd is not None:
            await _loops.wait_readable(self._pidfd)
        else:
            delay = 0.0005
            while not self._exited_unreaped():
                await _loops.sleep(delay)
                delay = min(delay * 2, 0.05)
        self._reap()
        return self._info()

    def wait_blocking(self, timeout: float) -> ExitInfo | None:
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while not self._reap():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if self._pidfd is not None:
                select.select([self._pidfd], [], [], None if math.isinf(remaining) else remaining)
            else:
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 0.05)
        return self._info()

    def _drop(self) -> None:
        if self._watched is not None and self._watcher is not None:
            self._watcher.unwatch(self._watched)
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        if self._popen.stdin is not None:
            # The loopback channel's lifeline: closed only now, after the reaping
            # (closing it earlier would end the worker).
            try:
                self._popen.stdin.close()
            except OSError:
                pass

    def forget(self) -> None:
        self._popen.returncode = 0  # the parent's child, not ours to reap
        self._drop()

    def release(self) -> bool:
        if not self._reap():
            return False
        self._drop()
        return True


class SpawnBackend:
    """Each worker a fresh interpreter, started by this process."""

    def __init__(self, blas_threads: int | None, memory_ceiling: int | None = None, memory_metric: str = "uss") -> None:
        self._env = child_environment(blas_threads)
        self._channel = channel_kind()
        self._watcher = CeilingWatcher(memory_ceiling, memory_metric) if memory_ceiling is not None else None

    @property
    def template_pid(self) -> None:
        return None

    async def start(self) -> None:
        pass

    async def start_worker(self) -> tuple[socket.socket, SpawnedWorker]:
        if self._channel == "loopback":
            # Waiting for the worker to connect takes an interpreter start.
            made: list[LoopbackWorker] = []

            def start() -> LoopbackWorker:
                made.append(start_loopback_worker(lambda port: child_command("worker", f"loopback:{port}"), self._env))
                return made[0]

            try:
                started = await _loops.to_thread_run_sync(start)
            except BaseException:
                # Cancelled meanwhile: under asyncio the cancel held off until
                # the thread is done is raised then, and its worker is lost to
                # us unless we end it here.
                for worker in made:
                    worker.discard()
                raise
            return started.channel, SpawnedWorker(started.popen, self._watcher)
        ours, theirs = channel_pair()
        try:
            popen = _launcher.popen(
                child_command("worker", str(theirs.fileno()), "--die-with-parent", str(os.getpid())),
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=self._env,
                # See the template's Popen: Ctrl-C is for the parent to handle.
                # It also makes the worker lead its own process group.
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return ours, SpawnedWorker(popen, self._watcher)

    def start_worker_now(self) -> None:
        return None  # an interpreter start is not cheap: workers start on demand

    def close(self, timeout: float) -> None:
        if self._watcher is not None:
            self._watcher.close(timeout)

    def forget_after_fork(self) -> None:
        pass  # the workers the pool held are forgotten by the pool; the watcher forgets its own
