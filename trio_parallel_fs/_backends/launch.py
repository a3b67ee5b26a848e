"""How the parent starts a child interpreter (the template, or a spawned
worker): its command line and its environment, one rule for both backends;
and a worker's channel, as both backends make it (`channel_pair`).

The command runs the child package's directory as a script
(``python /…/_trio_parallel_fs_worker template 5``): ``ps -ef`` then says what
each process is, and the package is found wherever this parent imported it
from, without touching PYTHONPATH (which the user's own subprocesses would
inherit).
"""

from __future__ import annotations

import os
import socket
import sys

import _trio_parallel_fs_worker

CHILD_PACKAGE = os.path.dirname(os.path.abspath(_trio_parallel_fs_worker.__file__))

# Thread pools that numerical libraries start at import time. Capped in the
# children's environment (unless the user set them) so that the template stays
# single-threaded and N workers do not run N x cores BLAS threads.
THREAD_LIMIT_VARIABLES = (
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


# The buffer a worker's channel asks for where the platform gives less:
# Linux's default (it reports twice what was set). macOS gives a Unix socket
# 8 KiB, so a job or reply of a few hundred KB (below the shared memory
# area's threshold) would cross in dozens of wake-ups, and a map's next chunk
# would seldom fit to be queued (`PooledWorker.can_send_ahead`).
CHANNEL_BUFFER = 106496
SMALL_BUFFER = 65536


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """A worker's channel: a Unix socketpair (ours, the worker's end) whose
    buffers are at least Linux's default (see CHANNEL_BUFFER)."""
    pair = socket.socketpair()
    for sock in pair:
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                if sock.getsockopt(socket.SOL_SOCKET, option) < SMALL_BUFFER:
                    sock.setsockopt(socket.SOL_SOCKET, option, CHANNEL_BUFFER)
            except OSError:  # a platform that refuses: its own buffer, slower but right
                pass
    return pair


def child_command(role: str, *args: str) -> list[str]:
    """``role`` is ``"template"`` or ``"worker"``; ``args`` follow it."""
    return [sys.executable, CHILD_PACKAGE, role, *args]


def child_environment(blas_threads: int | None) -> dict[str, str]:
    """The parent's environment of this moment, with the BLAS thread caps."""
    env = dict(os.environ)
    if blas_threads is not None:
        for name in THREAD_LIMIT_VARIABLES:
            env.setdefault(name, str(blas_threads))
    return env
