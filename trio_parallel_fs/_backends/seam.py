"""The seam between the pool and the ways of making workers.

The pool is handed a `Backend` (the template's forks, spawned interpreters,
a fake in the tests) and knows its workers only as `WorkerProcess` handles and
sockets: how a worker is started, killed and waited for is the backend's
business; the job traffic on the socket is the pool's, the same for all.
"""

from __future__ import annotations

import socket
from typing import Protocol

import attrs

# How long a backend may take to answer about a worker: a template's answer to
# a fork request or a kill (microseconds when it runs at all), or an exit
# report after a worker's channel closed or it was killed (milliseconds).
# Past this it is declared unresponsive.
ANSWER_TIMEOUT = 2.0


@attrs.frozen
class ExitInfo:
    """What is known about a worker's end."""

    pid: int | None
    exitcode: int | None  # negative: killed by that signal; None: unknown
    template_died: bool = False
    ceiling_used: int | None = None  # set if it was killed at the memory ceiling
    fork_errno: int | None = None  # set if the template could not fork it
    unresponsive: float | None = None  # set (seconds) if its template stopped answering
    channel_closed: bool = False  # set if it was killed for living on after its channel closed


class WorkerProcess(Protocol):
    """One worker process, as its backend knows it."""

    @property
    def pid(self) -> int | None:
        """Its pid, once known (a forked worker's arrives from the template)."""

    def answered(self) -> bool:
        """False while the worker's start is not confirmed (its template has
        not answered the fork request yet)."""

    def give_up(self) -> ExitInfo:
        """Its template did not answer in time: end it (and so this worker) and
        say so; the next call starts a new template."""

    def kill(self) -> None:
        """Ask for SIGKILL (and for the process group it leads); safe to call on
        a worker that already exited."""

    def has_exited(self) -> bool:
        """True if the worker is known to have exited (without waiting)."""

    def exited_cleanly(self) -> bool:
        """True if it is known to have exited with code 0 (as idle workers do)."""

    async def wait(self) -> ExitInfo:
        """Wait for the worker's exit report."""

    def wait_blocking(self, timeout: float) -> ExitInfo | None:
        """Like ``wait``, without Trio; None if ``timeout`` passed first."""

    def forget(self) -> None:
        """In a child forked from the parent: close our copies of the worker's
        fds; never signal, wait for or reap it (it is the parent's)."""

    def release(self) -> bool:
        """Give up interest in the worker. True if nothing is left to reap;
        otherwise call again later (a spawning parent must reap its children)."""


class Backend(Protocol):
    """What the pool needs from a way of making workers."""

    @property
    def template_pid(self) -> int | None:
        """The template's pid, for statistics (None: no template)."""

    async def start(self) -> None:
        """Be ready to start workers (start the template, if any); idempotent.
        Raises TemplateStartError if the template cannot preload."""

    async def start_worker(self) -> tuple[socket.socket, WorkerProcess]:
        """Start a worker; return the parent's end of its channel and its handle.
        Raises OSError if the backend broke since `start` (call `start` again)."""

    def start_worker_now(self) -> tuple[socket.socket, WorkerProcess] | None:
        """Start a worker without waiting, if that is cheap (a fork request to a
        running template: one ``sendmsg``); None where it is not (spawning an
        interpreter), or when the backend is not ready. The pool uses it to
        prepare a worker in place of one that retires."""

    def close(self, timeout: float) -> None:
        """Stop whatever the backend keeps running; later `start` calls fail."""

    def forget_after_fork(self) -> None:
        """In a child forked from the parent: drop every process and fd inherited
        from the parent's backend without signalling, waiting for or writing to
        any of them (they are the parent's), so the child can start its own."""
