"""Command line of the child processes the parent starts."""

from __future__ import annotations

import os
import socket
import traceback
from typing import NoReturn

from ._lifeline import die_with_parent, flush_std_streams, ignore_interrupts, keep_out_of_forks


def main(argv: list[str]) -> int:
    role = argv[0]
    if role == "worker" and argv[1].startswith("loopback:"):
        # The portable channel: connect to the parent's port; the secret comes
        # on stdin, which then stays open as the lifeline (see _loopback).
        ignore_interrupts()
        from ._loopback import connect_to_parent

        serve_then_leave(connect_to_parent(int(argv[1].partition(":")[2])).detach())
    fd = int(argv[1])
    if role == "template":
        from ._template import main as template_main

        return template_main(fd)
    if role == "worker":
        ignore_interrupts()
        if "--die-with-parent" in argv:
            die_with_parent(int(argv[argv.index("--die-with-parent") + 1]))
        serve_then_leave(fd)
    raise SystemExit(f"unknown role {role!r}; expected 'template' or 'worker'")


def serve_then_leave(fd: int) -> NoReturn:
    """Serve jobs on ``fd``, then leave by ``os._exit``, as a forked worker does.

    Returning would let the interpreter's shutdown join every non-daemon thread
    a job left running, so a worker told to retire could stay for as long as
    such a thread lives (forever, for a server thread), unseen by the parent.
    """
    from ._worker import serve

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
        flush_std_streams()
        os._exit(code)
