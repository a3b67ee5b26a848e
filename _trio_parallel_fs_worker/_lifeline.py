"""Process hygiene shared by workers and the template: signals, parent death."""

from __future__ import annotations

import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def ignore_interrupts() -> None:
    # Ctrl-C reaches the whole process group; Trio handles it in the parent,
    # which then cancels or kills workers as the caller asked.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_prctl = None


def prepare_prctl() -> None:
    """Load libc's prctl now: the template does it once, before forking, so that
    each worker skips loading ctypes and libc (a few hundred microseconds)."""
    global _prctl
    if _prctl is None and sys.platform.startswith("linux"):
        import ctypes

        _prctl = ctypes.CDLL(None, use_errno=True).prctl


_PR_SET_NAME = 15


def set_process_name(name: bytes) -> None:
    """Name this process for ps/top (Linux: /proc/<pid>/comm, 15 bytes at most)."""
    if _prctl is not None:
        _prctl(_PR_SET_NAME, name, 0, 0, 0)


def die_with_parent(expected_parent: int) -> None:
    """Get SIGKILLed when the parent dies (Linux), and exit now if it already has.

    PR_SET_PDEATHSIG fires when the *thread* that forked us exits, so it is only
    used where that thread lives as long as the parent: the single-threaded
    template, or a spawning parent's main thread. The getppid() check closes the
    race where the parent died before the prctl took effect.
    """
    if sys.platform.startswith("linux"):
        prepare_prctl()
        assert _prctl is not None
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != expected_parent:
        os._exit(1)


def flush_std_streams() -> None:
    # Workers leave by os._exit, which skips the flush that print() relies on.
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
