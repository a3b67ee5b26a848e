"""Command line of the child processes the parent starts."""

from __future__ import annotations

from ._lifeline import die_with_parent, ignore_interrupts
from ._worker import serve_then_leave


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
