"""The seam between the pool and the two backends: how a worker process is
started, killed and waited for. The job traffic itself is the same for both
backends and lives in ``_channel``.
"""

from __future__ import annotations

import socket
from typing import Protocol

import attrs


@attrs.frozen
class ExitInfo:
    """What is known about a worker's end."""

    pid: int | None
    exitcode: int | None  # negative: killed by that signal; None: unknown
    template_died: bool = False
    ceiling_used: int | None = None  # set if the template killed it at the memory ceiling
    fork_errno: int | None = None  # set if the template could not fork it


class WorkerProcess(Protocol):
    @property
    def pid(self) -> int | None: ...

    def kill(self) -> None:
        """Ask for SIGKILL; safe to call on a worker that already exited."""

    def has_exited(self) -> bool:
        """True if the worker is known to have exited (without waiting)."""

    def exited_cleanly(self) -> bool:
        """True if it is known to have exited with code 0 (as idle workers do)."""

    async def wait(self) -> ExitInfo:
        """Wait for the worker to be reaped and report how it ended."""

    def wait_blocking(self, timeout: float) -> ExitInfo | None:
        """Like ``wait``, without Trio; None if ``timeout`` passed first."""

    def release(self) -> bool:
        """Give up interest in the worker. True if nothing is left to reap;
        otherwise call again later (the spawn backend must reap its children)."""


class Backend(Protocol):
    def start_worker(self) -> tuple[socket.socket, WorkerProcess]:
        """Start a worker; return the parent's end of its channel and its handle."""

    def close(self, timeout: float) -> None:
        """Stop whatever the backend keeps running (the template)."""
