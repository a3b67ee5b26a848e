"""The template: a preloaded, single-threaded process that forks workers.

Theory of operation
-------------------
The parent starts this process as a fresh interpreter with one end of a
socketpair (the *control channel*). No named or abstract socket exists, so no
other local user can ask the template for anything.

1. The parent sends its settings: sys.path, modules to preload, the memory
   ceiling (a ``Config`` event holding `TemplateSettings`). The template
   imports the modules, checks it is still single-threaded, then
   ``gc.collect(); gc.freeze()`` so that garbage collections in workers do not
   write to (and so un-share) the template's objects. It answers ``Ready``
   or ``InitFailed`` (with the import error).
2. For each FORK record the parent sends two fds by SCM_RIGHTS: the write end
   of a status pipe, and the worker's end of a fresh socketpair. The template
   forks; the child serves jobs on its socket, straight to the parent; the
   template writes ``PID <pid>`` on the status pipe.
3. The template alone reaps its workers (they are not the parent's children).
   On SIGCHLD it waits for them and writes ``EXITED <status>`` on each one's
   status pipe. KILL names a fork by its sequence number, and the template
   kills only workers it has not reaped, so a recycled pid is never hit.
4. *Spare* workers are forked ahead of demand (one after the first fork
   request, and again each time one is used). Each waits on a private
   socketpair; a FORK hands the oldest the worker's channel by SCM_RIGHTS
   instead of forking then, so a fresh worker costs a sendmsg, not a fork.
   A FORK_AHEAD request (the successor of a retiring worker, as with
   ``max_jobs=1``) that finds no spare raises the number kept by one, up to
   `_MAX_SPARES`: a burst of single-use workers then takes its successors
   from spares instead of forking them while its jobs wait for the CPUs. The
   template refills spares one at a time, each once a CPU is idle (or after
   `_SPARE_BUSY_WAIT` of busy CPUs), so that the forks of a burst's
   successors run after the burst rather than during it. A spare that died
   is reaped like any child and simply not used.
5. EOF on the control channel means the parent is gone or done: SIGKILL every
   worker and the spares, reap them, exit. Workers also die with the template
   (PR_SET_PDEATHSIG; the template is single-threaded, so the forking thread
   lives exactly as long as the template).
6. A job's own processes: each worker leads its own process group, which the
   processes its jobs start inherit, and a worker is always killed with its
   group, also when it exits on its own (where ``waitid`` can see the exit
   before the reaping: a process its job forked at C level would otherwise
   keep its channel open). The template is a child subreaper (Linux), so a job's process
   orphaned by its worker's exit comes to the template instead of init; it is
   reaped like any child, and killed at shutdown at the latest.
7. Running out of resources (fds, processes) never ends the template: a fork
   request that cannot be met gets FORK_FAILED with the errno on its status
   pipe (or, when even its fds could not be received, loses its status pipe,
   which the parent sees close without a PID), and a spare that cannot be
   made is tried again later, backing off.
8. The page plan (``_page_plan``, Linux): the template owns it. Every child
   inherits the published plan's sealed memfd; the one child the owner asks
   to learn (decided at its fork) also gets the sending end of a datagram
   socket, whose other end the loop watches; every other child closes it.
   Lessons are read without waiting, when they arrive or when the learner is
   reaped, and checked before they are published.
"""

from __future__ import annotations

import array
import atexit
import errno
import gc
import importlib
import os
import pickle
import selectors
import signal
import socket
import sys
import threading
import time
from collections import deque
from typing import NamedTuple

from . import protocol as p
from ._lifeline import (
    become_subreaper,
    child_pids,
    die_with_parent,
    flush_std_streams,
    ignore_interrupts,
    prepare_prctl,
    set_process_name,
)
from ._memory import exceeds
from ._page_plan import PlanOwner, apply_plan_while_idle, cpu_to_spare, open_book
from ._settings import TemplateInitError, TemplateSettings, WorkerHooks, WorkerSettings
from ._spin import busy_waits_pay, input_poller
from ._worker import Inbox, RetirePolicy, execute, load_settings, serve_then_leave
from .codec import dumps_job, encode_error

_MAX_FDS_PER_READ = 64
_SPARE_REFILL_DELAY = 0.005
# At most this many spares. Each holds the pages its start-up copied
# (about 3 MB USS with numpy and scipy preloaded) for as long as it waits.
_MAX_SPARES = 8
# A missing spare waits for an idle CPU (checked every _SPARE_REFILL_DELAY)
# at most this long; then it is forked on a busy machine too.
_SPARE_BUSY_WAIT = 0.1
# waitid(WNOWAIT) sees an exit without reaping it (Linux; macOS from Python 3.13).
_HAS_WAITID = hasattr(os, "waitid") and hasattr(os, "WNOWAIT")
# After a failed refill (out of fds or processes): try again after this, doubling up to the cap.
_SPARE_RETRY_FIRST = 0.05
_SPARE_RETRY_CAP = 2.0
# The order of the fds that ride with each FORK record.
_FDS_PER_FORK = 2


def count_threads() -> int:
    """OS threads in this process, native ones included (a BLAS pool started
    at import has no Python thread): /proc on Linux, psutil elsewhere (macOS
    asks the kernel); Python's own count only if neither answers."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.Process().num_threads())
    except Exception:  # noqa: BLE001 - psutil missing or refusing: the weaker count
        return threading.active_count()


def preload(modules: tuple[str, ...], template_init: bytes | None) -> None:
    """Import ``modules``, then run the template initializer, checking after each
    step that the template is still single-threaded."""
    for name in modules:
        importlib.import_module(name)
        check_single_threaded(f"importing {name!r}")
    if template_init is not None:
        try:
            pickle.loads(template_init)()
        except BaseException as exc:
            raise TemplateInitError(f"its template_init raised {type(exc).__name__}: {exc}") from exc
        check_single_threaded("running template_init")


def check_single_threaded(step: str) -> None:
    count = count_threads()
    if count > 1:
        python_threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
        raise RuntimeError(
            f"{step} in the template left {count} threads running "
            f"(Python threads besides the main one: {python_threads or 'none'}; the rest are "
            "native, e.g. a BLAS pool); forking a multi-threaded process can "
            "deadlock, so the template refuses to fork. Cap the module's threads "
            "(trio_parallel_fs sets OPENBLAS_NUM_THREADS, OMP_NUM_THREADS and friends "
            "to blas_threads=1 unless you set them), or do not preload it."
        )


def receive_channel(handoff: socket.socket) -> int | None:
    """As the spare: wait for the channel the template hands over (None on EOF)."""
    data, ancdata, _, _ = handoff.recvmsg(1, socket.CMSG_SPACE(4))
    handoff.close()
    for level, kind, fd_bytes in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and data:
            return int(array.array("i", fd_bytes[:4])[0])
    return None


class Rehearsal(NamedTuple):
    """What a spare rehearses (see `rehearse`), pickled once in the template:
    pickling a function by value costs a millisecond of cloudpickle that each
    spare would otherwise pay again."""

    hooks: bytes  # WorkerHooks as a parent sends them, with the defaults' callables
    jobs: tuple[bytes, ...]


def rehearsal() -> Rehearsal:
    by_value, _ = dumps_job(lambda n: [n] * 3, (7,))
    hooks = WorkerHooks(600.0, bool, bool, 1, 0, None, "uss", 0.0)
    return Rehearsal(pickle.dumps(hooks), (pickle.dumps((int, ("7",))), by_value))


def rehearse(rehearsal: Rehearsal) -> None:
    """As the spare, run dummy jobs through the worker's code paths while
    nobody waits: the copy-on-write faults that a first job triggers (refcount
    writes to the template's objects) are paid now instead of on the caller's
    time. The settings, then two jobs: one by reference (plain pickle), one
    by value with a result that needs cloudpickle, the path of functions from
    ``__main__``; through a socket, the Inbox and the Connection both ends
    use, as a worker's first job goes (`serve` itself would take the page
    plan and a learner's lesson socket with it)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        parent, worker = p.Connection(p.PARENT), p.Connection(p.WORKER)
        inbox = Inbox(theirs, worker)
        events: list[p.Event] = [p.Config(WorkerSettings(os.getcwd(), None, (), None, rehearsal.hooks))]
        events.extend(p.Job(pickled) for pickled in rehearsal.jobs)
        for event in events:
            ours.sendall(b"".join(bytes(part) for part in parent.send(event)))
            received = inbox.next_event()
            if isinstance(received, p.Config):
                assert isinstance(received.settings, WorkerSettings)
                RetirePolicy(load_settings(received.settings))
            else:
                assert isinstance(received, p.Job)
                for part in worker.send(execute(received)):
                    theirs.sendall(part)  # small: the socket's buffer holds it
    encode_error(ValueError("rehearsal"))


def reseed_numpy() -> None:
    """Give each worker its own numpy global random state.

    The stdlib's random module reseeds itself in a forked child; numpy's legacy
    global RandomState does not, so every worker forked after the template
    imported numpy.random would draw the same numbers.

    The Mersenne Twister's whole state comes from the OS's entropy (no cached
    Gaussian): ``seed()`` gets there through a SeedSequence, which in a fresh
    worker took 0.45-0.55 ms and 146 page faults, this 0.26-0.34 ms and 81
    (numpy and scipy imported, in a fork-only test).
    """
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy = sys.modules["numpy"]
        key = numpy.frombuffer(os.urandom(624 * 4), dtype=numpy.uint32)
        numpy_random.set_state(("MT19937", key, 624, 0, 0.0))  # 624: regenerate before the first draw


def spares_wanted(kept: int, ahead: bool) -> int:
    """How many spares to keep after a fork request found none, ``kept``
    before: one from the first request on, and one more for each successor
    prepared ahead (``ahead``) that had to be forked, up to `_MAX_SPARES`."""
    return min(_MAX_SPARES, kept + 1 if ahead else max(kept, 1))


def lead_own_group(pid: int) -> None:
    """Make the child ``pid`` lead its own process group. The child does it too,
    first thing: whichever runs first wins, so that a kill right after the fork
    already reaches the whole group."""
    try:
        os.setpgid(pid, pid)
    except OSError:  # it has already exited (ESRCH), or done it itself
        pass


def kill_with_group(pid: int) -> None:
    """SIGKILL an unreaped child and the process group it leads: whatever its
    jobs started goes with it."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:  # no such group (it left it, or is a zombie): the child alone
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Template:
    def __init__(self, control: socket.socket, settings: TemplateSettings, book: PlanOwner | None = None) -> None:
        self.control = control
        self.book = book  # the page plan's owner (see _page_plan), where plans work
        self.pid = os.getpid()
        self.pending_fds: deque[int] = deque()
        self.next_seq = 0
        self.workers: dict[int, tuple[int, int]] = {}  # seq -> (pid, status fd)
        self.seq_of_pid: dict[int, int] = {}
        self.ceiling = settings.memory_ceiling
        self.ceiling_metric = settings.memory_metric
        # Cheap: each tick reads each worker's statm (RSS); USS is computed only
        # for a worker whose RSS is above the ceiling.
        self.ceiling_interval = settings.ceiling_interval
        self.buffer = b""  # a partial control record, if any
        self.spares: deque[tuple[int, socket.socket]] = deque()  # (pid, our end of its handoff), oldest first
        self.spare_target = 0  # how many spares to keep: none until someone asked for a worker
        # Spares beyond the first leave this long after the last request made
        # ahead of demand: a burst's successors, kept for the next burst.
        self.extra_spares_for = settings.extra_spares_for
        self.last_ahead = 0.0  # when the last request made ahead of demand came
        self.rehearsal = rehearsal()
        self.refill_at: float | None = None  # when to look at forking the next spare
        self.missing_since: float | None = None  # since when a spare has been missing
        self.refill_retry = _SPARE_RETRY_FIRST  # the wait after the next failed refill
        self.selector: selectors.BaseSelector | None = None
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)

    # --- status pipe ------------------------------------------------------

    def report(self, status_fd: int, tag: bytes, value: int) -> None:
        try:
            os.write(status_fd, p.STATUS_RECORD.pack(tag, value))
        except OSError:
            pass  # the parent closed its end: it no longer cares

    # --- fork -------------------------------------------------------------

    def fork(self, channel_fd: int, status_fd: int, ahead: bool = False) -> None:
        seq = self.next_seq
        self.next_seq += 1
        if ahead:
            self.last_ahead = time.monotonic()
        pid = self.hand_to_spare(channel_fd)
        if pid is None:
            self.spare_target = spares_wanted(self.spare_target, ahead)
            try:
                pid, lesson = self.fork_child()
            except OSError as exc:  # EAGAIN, ENOMEM: this request fails, nothing else
                self.fail_request(channel_fd, status_fd, exc.errno or 0)
                return
            if pid == 0:
                self.become_worker(channel_fd, status_fd, lesson=lesson)
            lead_own_group(pid)
        os.close(channel_fd)
        self.workers[seq] = (pid, status_fd)
        self.seq_of_pid[pid] = seq
        self.report(status_fd, p.PID, pid)

    def fork_child(self) -> tuple[int, socket.socket | None]:
        """``os.fork()``, telling the page plan's owner, which may ask the
        child to learn: then the child gets (and only it keeps) the sending end
        of a lesson socket, returned with the pid."""
        lesson = self.book.before_fork() if self.book is not None else None
        try:
            pid = os.fork()
        except OSError:
            if self.book is not None:
                self.book.forked(None, lesson)
            raise
        if pid != 0 and self.book is not None:
            self.book.forked(pid, lesson)
        return pid, lesson

    def fail_request(self, channel_fd: int | None, status_fd: int | None, errno: int) -> None:
        """A fork request that cannot be met: say why on its status pipe (if
        its fds arrived at all) and drop its fds. Its sequence number is used."""
        if status_fd is not None:
            self.report(status_fd, p.FORK_FAILED, errno)
            os.close(status_fd)
        if channel_fd is not None:
            os.close(channel_fd)

    def hand_to_spare(self, channel_fd: int) -> int | None:
        """Give the channel to the oldest spare (the longest prepared); its
        pid, or None if there is no spare."""
        fds = array.array("i", [channel_fd]).tobytes()
        while self.spares:
            pid, handoff = self.spares.popleft()
            try:
                handoff.sendmsg([b"W"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            except OSError:
                # It died and is not reaped yet, so its pid is still ours to kill.
                kill_with_group(pid)
                continue
            finally:
                handoff.close()
            return pid
        return None

    def fork_spare(self) -> None:
        try:
            ours, theirs = socket.socketpair()
        except OSError:  # EMFILE, ENFILE
            self.retry_spare_later()
            return
        try:
            pid, lesson = self.fork_child()
        except OSError:  # EAGAIN, ENOMEM
            ours.close()
            theirs.close()
            self.retry_spare_later()
            return
        if pid == 0:
            ours.close()
            self.become_worker(None, None, handoff=theirs, lesson=lesson)
        lead_own_group(pid)
        theirs.close()
        self.spares.append((pid, ours))
        self.refill_retry = _SPARE_RETRY_FIRST

    def retry_spare_later(self) -> None:
        """No spare for now: requests fork directly meanwhile (and fail on
        their own if that fails too)."""
        self.refill_at = time.monotonic() + self.refill_retry
        self.refill_retry = min(self.refill_retry * 2, _SPARE_RETRY_CAP)

    def shed_spares_at(self) -> float | None:
        """When the spares beyond the first are to leave, if there are any."""
        if self.spare_target <= 1:
            return None
        return self.last_ahead + self.extra_spares_for

    def shed_spares(self) -> None:
        """No burst for a while: keep one spare again, and let the others go
        (the newest first; each holds what its start-up copied, a few MB).
        Closing its handoff socket tells a spare to exit, as at shutdown."""
        self.spare_target = 1
        while len(self.spares) > 1:
            _, handoff = self.spares.pop()
            handoff.close()

    def refill_soon(self) -> None:
        """Look at forking a spare shortly, if one is missing and no look is due."""
        if len(self.spares) < self.spare_target and self.refill_at is None:
            self.refill_at = time.monotonic() + _SPARE_REFILL_DELAY

    def refill(self) -> None:
        """Fork one missing spare if a CPU is idle (a fork costs milliseconds
        of the template's CPU, and the spare's start-up as much again: on a
        busy machine that is taken from jobs, in a burst from the very jobs
        the spares are for), or if spares have been missing for
        `_SPARE_BUSY_WAIT` (the machine stays busy: spares are still worth
        having, and come one per look from then on); then look again soon
        while another is missing."""
        self.refill_at = None
        if len(self.spares) >= self.spare_target:
            self.missing_since = None
            return
        now = time.monotonic()
        if self.missing_since is None:
            self.missing_since = now
        if cpu_to_spare() or now - self.missing_since >= _SPARE_BUSY_WAIT:
            self.fork_spare()  # on failure it sets refill_at itself
        self.refill_soon()

    def become_worker(
        self,
        channel_fd: int | None,
        own_status_fd: int | None,
        handoff: socket.socket | None = None,
        lesson: socket.socket | None = None,
    ) -> None:
        code = 1
        try:
            # First, before anything can start a process: the processes this
            # worker's jobs start join its group, and die with it.
            os.setpgid(0, 0)
            # Close what belongs to the template, so that no worker keeps the
            # control channel (or a sibling's status pipe) open after the template
            # is gone, nor watches the template's fds through its epoll instance.
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            self.control.close()
            if self.selector is not None:
                self.selector.close()
            for fd in (self.wake_r, self.wake_w, *self.pending_fds):
                os.close(fd)
            if own_status_fd is not None:
                os.close(own_status_fd)
            for _, status_fd in self.workers.values():
                os.close(status_fd)
            for _, spare_handoff in self.spares:
                spare_handoff.close()
            if self.book is not None:  # keeps the plan's fd, and ``lesson`` if any
                self.book.in_child(lesson)
            die_with_parent(self.pid)
            atexit._clear()
            reseed_numpy()
            if handoff is not None:
                set_process_name(b"tpf-spare")
                try:
                    rehearse(self.rehearsal)
                except Exception:  # noqa: BLE001 - e.g. the working directory is gone: the job pays its faults
                    pass
                # Take the page plan's faults (those of the jobs the last
                # workers ran) now, while no channel has come: a spare is
                # forked when a CPU is idle, and the worker it becomes in a
                # burst would have no idle moment left to do it.
                handed = input_poller(handoff)
                apply_plan_while_idle(lambda ms: bool(handed(ms)), remapped=False, spare=True)
                channel_fd = receive_channel(handoff)
                if channel_fd is None:
                    code = 0  # the template shut down before using us
                    return
            set_process_name(b"tpf-worker")
            assert channel_fd is not None
            serve_then_leave(channel_fd)  # never returns
        except BaseException:  # noqa: BLE001 - report anything, then leave
            import traceback

            traceback.print_exc()
        finally:
            # Never return into the template's code: this is its fork.
            try:
                flush_std_streams()
            finally:
                os._exit(code)

    # --- reaping and killing ----------------------------------------------

    def reap(self) -> None:
        while True:
            try:
                if _HAS_WAITID:
                    # See the exit before reaping, and kill the group the worker
                    # led while its pid (the group's id) cannot be reused: a
                    # process its job forked at C level (no at-fork hook ran
                    # there) may hold its channel, and the parent would get no
                    # end-of-file.
                    seen = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                    if seen is None:
                        return
                    if seen.si_pid in self.seq_of_pid:
                        kill_with_group(seen.si_pid)
                    pid, status = os.waitpid(seen.si_pid, 0)
                else:
                    pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.forget(pid, status)

    def forget(self, pid: int, status: int) -> None:
        if self.book is not None:
            self.book.exited(pid)
        for spare in self.spares:
            if spare[0] == pid:
                # A spare died before it was used (killed from outside).
                spare[1].close()
                self.spares.remove(spare)
                self.refill_soon()
                return
        seq = self.seq_of_pid.pop(pid, None)
        if seq is None:
            return  # a child of a preloaded module, not a worker
        _, status_fd = self.workers.pop(seq)
        self.report(status_fd, p.EXITED, status)
        os.close(status_fd)

    def kill(self, seq: int) -> None:
        if seq in self.workers:  # not reaped yet, so the pid is still ours
            kill_with_group(self.workers[seq][0])

    def enforce_ceiling(self) -> None:
        assert self.ceiling is not None
        for pid, status_fd in list(self.workers.values()):
            try:
                used = exceeds(self.ceiling, self.ceiling_metric, pid)
            except Exception:  # noqa: BLE001 - it exited between listing and reading
                continue
            if used is not None:
                # The figure goes first, so the parent can tell why the worker died.
                self.report(status_fd, p.CEILING, used)
                kill_with_group(pid)

    def shutdown(self) -> None:
        for pid, _ in self.workers.values():
            kill_with_group(pid)
        for pid, _ in self.spares:
            kill_with_group(pid)
        while self.workers or self.spares:
            pid, status = os.waitpid(-1, 0)
            self.forget(pid, status)
        self.kill_adopted()

    def kill_adopted(self) -> None:
        """Kill and reap the children left: processes that jobs started and
        their workers left behind (adopted by this subreaper), and their own
        children, adopted in turn as their parents die."""
        while children := child_pids():
            for pid in children:
                # Our unreaped children: their pids cannot have been reused.
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for pid in children:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
        self.reap()  # zombies on systems where child_pids() sees nothing

    # --- the loop ---------------------------------------------------------

    def read_control(self) -> bool:
        """Handle what the parent sent; False on EOF."""
        # Out of fds, the kernel delivers only the first ones (MSG_CTRUNC) and
        # closes the rest: the requests they belonged to are failed below.
        data, ancdata, _, _ = self.control.recvmsg(
            p.CONTROL_RECORD.size * 256, socket.CMSG_SPACE(_MAX_FDS_PER_READ * 4)
        )
        for level, kind, fd_bytes in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(fd_bytes[: len(fd_bytes) - len(fd_bytes) % fds.itemsize])
                self.pending_fds.extend(fds)
        if not data:
            return False
        self.buffer += data
        records, self.buffer = p.parse_records(self.buffer, p.CONTROL_RECORD)
        for command, value in records:
            if command == p.FORK:
                if len(self.pending_fds) >= _FDS_PER_FORK:
                    # The status pipe comes first: it is the one that arrives
                    # when the kernel can deliver only one.
                    status_fd = self.pending_fds.popleft()
                    channel_fd = self.pending_fds.popleft()
                    self.fork(channel_fd, status_fd, ahead=value == p.FORK_AHEAD)
                else:
                    # Its fds did not all arrive: fail it on its status pipe, if that came.
                    self.next_seq += 1
                    status = self.pending_fds.popleft() if self.pending_fds else None
                    self.fail_request(None, status, errno.EMFILE)
            elif command == p.KILL:
                self.kill(value)
        # Not right away: the worker just handed a channel is waking up,
        # likely on this CPU, and a fork now (milliseconds of page-table
        # copying) would make it wait. Refill once things are quiet.
        self.refill_soon()
        return True

    def run(self) -> None:
        signal.set_wakeup_fd(self.wake_w)
        # A handler (not SIG_DFL) so that SIGCHLD writes to the wakeup fd.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        self.selector = selector = selectors.DefaultSelector()
        selector.register(self.control, selectors.EVENT_READ, "control")
        selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        if self.book is not None:
            self.book.watch(selector)  # registers its lesson socket, when it has one
        next_check = time.monotonic()
        try:
            while True:
                deadlines = []
                if self.ceiling is not None and self.workers:
                    deadlines.append(next_check)
                if self.refill_at is not None:
                    deadlines.append(self.refill_at)
                shed_at = self.shed_spares_at()
                if shed_at is not None:
                    deadlines.append(shed_at)
                timeout = max(min(deadlines) - time.monotonic(), 0) if deadlines else None
                for key, _ in selector.select(timeout):
                    if key.data == "control":
                        if not self.read_control():
                            return
                    elif key.data == "lesson":
                        assert self.book is not None
                        self.book.read_lessons()
                    else:
                        try:
                            os.read(self.wake_r, 4096)
                        except BlockingIOError:
                            pass
                self.reap()
                if self.refill_at is not None and time.monotonic() >= self.refill_at:
                    self.refill()
                shed_at = self.shed_spares_at()
                if shed_at is not None and time.monotonic() >= shed_at:
                    self.shed_spares()
                if self.ceiling is not None and time.monotonic() >= next_check:
                    self.enforce_ceiling()
                    next_check = time.monotonic() + self.ceiling_interval
        finally:
            self.shutdown()


def send(sock: socket.socket, connection: p.Connection, event: p.Event) -> None:
    """Send one event, blocking (the handshake)."""
    for part in connection.send(event):
        sock.sendall(part)


def receive(sock: socket.socket, connection: p.Connection) -> p.Event:
    """Receive one event, blocking (the handshake)."""
    while (event := connection.next_event()) is p.NEED_DATA:
        connection.receive_data(sock.recv(p.RECV_SIZE))
    return event  # type: ignore[return-value]


def main(control_fd: int) -> int:
    ignore_interrupts()
    control = socket.socket(fileno=control_fd)
    control.setblocking(True)
    connection = p.Connection(p.TEMPLATE)
    config = receive(control, connection)
    if not isinstance(config, p.Config):
        raise EOFError("the parent closed the channel during the handshake")
    settings = config.settings
    assert isinstance(settings, TemplateSettings)  # the Connection checked it
    sys.path[:] = settings.sys_path
    try:
        prepare_prctl()
        busy_waits_pay()  # asked here once, for every worker forked from now on
        become_subreaper()
        preload(settings.preload, settings.template_init)
        book = open_book()  # after preloading: the plans name the mappings the template has now
        gc.collect()
        gc.freeze()
    except BaseException as exc:  # noqa: BLE001 - the parent shows it at context start
        send(control, connection, p.InitFailed(encode_error(exc)))
        return 1
    set_process_name(b"tpf-template")
    send(control, connection, p.Ready(os.getpid()))
    Template(control, settings, book).run()
    return 0
