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
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_TIMERSLACK = 29


def tighten_timers() -> None:
    """Have this process's timed waits end on time, within a microsecond.

    By default Linux may end them up to 50 µs late, to wake the CPU once for
    several timers; a worker that sleeps through most of a regular wait for
    its next job (``_spin``) must be up before the job comes (measured:
    woken after the job in 6 of 10 calls with the default, 1 in 1000 with this)."""
    prepare_prctl()
    if _prctl is not None:
        _prctl(_PR_SET_TIMERSLACK, 1000, 0, 0, 0)


def set_process_name(name: bytes) -> None:
    """Name this process for ps/top (Linux: /proc/<pid>/comm, 15 bytes at most)."""
    if _prctl is not None:
        _prctl(_PR_SET_NAME, name, 0, 0, 0)


def become_subreaper() -> bool:
    """Adopt the orphans of our descendants (Linux; False elsewhere).

    A job may start processes of its own. When its worker exits, those would
    be re-parented to init and outlive everything; as a child subreaper the
    template gets them instead, and can kill them (see ``Template.shutdown``).
    """
    prepare_prctl()
    if _prctl is None:
        return False
    return bool(_prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def child_pids() -> list[int]:
    """Pids of this process's children, adopted orphans included (Linux: read
    from /proc; elsewhere an empty list)."""
    me = os.getpid()
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == me:
            found.append(int(entry))
    return found


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
    # A job may have put anything in sys.stdout: whatever its flush raises
    # must not stop the os._exit that follows (a forked worker would go on
    # running the template's code, and kill its siblings as the template does).
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except BaseException:  # noqa: BLE001, S110 - leaving regardless
            pass


def keep_out_of_forks(fd: int) -> None:
    """Make every process forked from this one (a job's multiprocessing helper,
    ``os.fork``) drop its copy of ``fd``, this worker's channel.

    A helper that kept a copy would keep the channel open after this worker
    died, and the parent, waiting for end-of-file, would not learn of the
    death until the helper exits. ``exec`` already closes it (sockets are
    non-inheritable); a fork without exec needs this. The fd number stays
    taken (pointing at the null device), so the socket object the child
    inherited closes something harmless.
    """
    if not hasattr(os, "register_at_fork"):
        return

    def drop() -> None:
        null = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)

    os.register_at_fork(after_in_child=drop)


def step_aside() -> None:
    """Lower this process's priority: it is about to exit, after its last reply.

    Tearing down a worker's memory takes a millisecond or more, and the kernel
    tends to wake the caller that the reply is for on the very CPU this worker
    runs on (it expects a process that just sent something to sleep next).
    At the lowest priority the teardown yields that CPU at once (measured: a
    single-use worker whose init hook had touched its pages answered in
    2.3-2.5 ms instead of 1.3-1.4 ms without this)."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    except (AttributeError, OSError):  # Windows has no setpriority
        pass
