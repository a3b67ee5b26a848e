"""The worker's end of the portable channel: connect back, prove who we are, watch stdin.

The parent (``trio_parallel_fs._backends.spawn.loopback``) listens on 127.0.0.1 and puts a
one-time secret on this process's stdin. Here the worker reads the secret,
connects to the port it was given on its command line and sends the secret
first, so the parent can tell it from any other local process.

The stdin pipe then stays open for the worker's whole life: it is the
lifeline. The parent never writes to it again, so a read returns only when the
parent's end closes, which the OS does when the parent dies, however it dies.
A daemon thread blocks on that read and ends the process at once: an idle
worker would notice its channel closing anyway, but a busy one would otherwise
run its job to the end with nobody to report to. A thread is safe here because
spawned workers are never forked from.

The thread can only run when it gets the GIL: a job stuck in C code that holds
the GIL delays the exit until it returns or releases it (pure Python code, and
C code that releases the GIL, such as sleeping, I/O and most numpy kernels,
does not).

Portable: sockets and pipes only; no ``pass_fds``, no ``PR_SET_PDEATHSIG``.
"""

from __future__ import annotations

import os
import socket
import threading

SECRET_SIZE = 32  # trio_parallel_fs._backends.spawn.loopback.SECRET_SIZE; the child package never imports the parent's

# The exit code of a worker whose parent is gone. Nobody waits for it (the
# parent is dead); it differs from 0 so that a worker ended this way by a
# parent that closed the lifeline on purpose is not mistaken for a clean exit.
PARENT_GONE_EXIT_CODE = 3

_STDIN = 0


def _read_secret(fd: int) -> bytes:
    secret = b""
    while len(secret) < SECRET_SIZE:
        chunk = os.read(fd, SECRET_SIZE - len(secret))
        if not chunk:
            # The parent died (or closed our stdin) before handing us the secret.
            os._exit(PARENT_GONE_EXIT_CODE)
        secret += chunk
    return secret


def _take_stdin() -> int:
    """Move stdin to a private, non-inheritable fd and point fd 0 at the null device.

    Job code that reads or closes ``sys.stdin`` then cannot disturb the
    lifeline, and subprocesses the job starts do not inherit it.
    """
    lifeline = os.dup(_STDIN)
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, _STDIN)
    finally:
        os.close(null)
    return lifeline


def _wait_for_parent_exit(lifeline: int) -> None:
    while True:
        try:
            if not os.read(lifeline, 256):
                break
        except OSError:  # a broken pipe on Windows: the same news
            break
    os._exit(PARENT_GONE_EXIT_CODE)


def watch_lifeline(lifeline: int) -> threading.Thread:
    """Start the daemon thread that ends this process when ``lifeline`` reaches EOF."""
    thread = threading.Thread(
        target=_wait_for_parent_exit, args=(lifeline,), name="trio_parallel_fs lifeline", daemon=True
    )
    thread.start()
    return thread


def connect_to_parent(port: int) -> socket.socket:
    """Read the secret from stdin, connect to the parent on ``port``, authenticate.

    Also starts the lifeline thread (see the module docstring). Returns the
    connected, blocking socket, ready for ``_worker.serve``.

    Raises:
        OSError: The connection failed (the parent gave up waiting, or is gone).
    """
    secret = _read_secret(_STDIN)
    # Watch for the parent's death from here on, before anything that could
    # wait (connecting, and then serving jobs).
    watch_lifeline(_take_stdin())
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        # Frames go out in parts (header, pickle, buffers): without this, a part
        # would wait for the ACK of the one before (Nagle plus delayed ACKs).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(secret)
    except BaseException:
        sock.close()
        raise
    return sock

