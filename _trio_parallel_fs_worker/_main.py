"""Command line of the child processes the parent starts."""

from __future__ import annotations

import socket

from ._lifeline import die_with_parent, flush_std_streams, ignore_interrupts


def main(argv: list[str]) -> int:
    role, fd = argv[0], int(argv[1])
    if role == "template":
        from ._template import main as template_main

        return template_main(fd)
    if role == "worker":
        ignore_interrupts()
        if "--die-with-parent" in argv:
            die_with_parent(int(argv[argv.index("--die-with-parent") + 1]))
        from ._worker import serve

        try:
            return serve(socket.socket(fileno=fd))
        finally:
            flush_std_streams()
    raise SystemExit(f"unknown role {role!r}; expected 'template' or 'worker'")

