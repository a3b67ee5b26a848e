"""Faults: workers and templates dying in every way, cancellation at every
checkpoint, Ctrl-C, SIGTERM, and shutdown while work is in flight.

Each test proves that the caller gets the right exception, that calls running
at the same time are not disturbed, that the next call works, and (through the
autouse fixture in conftest) that nothing is left behind. Processes are only
ever signalled by pids obtained as descendants of processes these tests
started.
"""

from __future__ import annotations

import sys

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("needs Linux: /proc, PR_SET_PDEATHSIG, process groups and signals", allow_module_level=True)

import ctypes
import functools
import os
import signal
import socket
import subprocess
import time
import uuid

import psutil
import trio
import workerfns
from conftest import wait_dead, wait_until_gone

import trio_parallel_fs as tpf
from trio_parallel_fs._introspect import context_processes

HERE = os.path.dirname(os.path.abspath(__file__))

# Generous bounds for "does not hang"; never assertions about speed.
HANG = 30


# --- helpers --------------------------------------------------------------------


def worker_processes(ctx) -> list[psutil.Process]:
    """The context's live worker processes, as seen from outside."""
    template_pid = ctx.statistics().template_pid
    if template_pid is not None:
        try:
            return psutil.Process(template_pid).children()
        except psutil.NoSuchProcess:
            return []
    return [p for p in psutil.Process().children() if is_spawned_worker(p)]


def busy_workers(ctx) -> list[int]:
    """Pids of the context's workers, as the template reported them."""
    return [record.pid for record in context_processes(ctx) if record.role == "worker"]


def is_spawned_worker(process: psutil.Process) -> bool:
    try:
        cmdline = process.cmdline()
    except psutil.Error:
        return False
    return "_trio_parallel_fs_worker" in " ".join(cmdline) and "worker" in cmdline


async def wait_reaped(pid: int) -> None:
    with trio.fail_after(HANG):
        while psutil.pid_exists(pid):  # noqa: ASYNC110 - polling other processes
            await trio.sleep(0.01)


async def wait_for_pid_file(path) -> int:
    with trio.fail_after(HANG):
        while not os.path.exists(path):  # noqa: ASYNC110, ASYNC240 - written by another process
            await trio.sleep(0.01)
    with open(path) as f:  # noqa: ASYNC230 - a few bytes, written already
        return int(f.read())


def signal_descendant(pid: int, signum: int) -> None:
    """Signal ``pid``, which must be one of our descendants (checked here)."""
    signal_descendants([pid], signum)


def signal_descendants(pids, signum: int) -> None:
    """Signal all of ``pids`` (our descendants, checked first) as one group: a
    process that dies of an earlier one's signal is not an error."""
    ours = {p.pid: p for p in psutil.Process().children(recursive=True)}
    missing = set(pids) - set(ours)
    assert not missing, f"{missing} are not descendants of this test process"
    for pid in pids:
        try:
            ours[pid].send_signal(signum)  # psutil checks the pid was not reused
        except psutil.NoSuchProcess:
            pass


async def run_others(ctx, limiter, results, count, seconds):
    """``count`` jobs that must complete while something else goes wrong."""

    async def one(i):
        results[i] = await ctx.run_sync(workerfns.tagged, i, seconds, limiter=limiter)

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)


def check_others(results, count, bad_pids):
    assert sorted(results) == list(range(count))
    for i, (tag, j, square, pid) in results.items():
        assert (tag, j, square) == ("tagged", i, i * i + 7)
        assert pid not in bad_pids


# --- a worker dies in the middle of a job ---------------------------------------------

DEATHS = {
    # name: (signal or None, expected message, expected exitcode)
    "segfault": (
        None,
        r"died with signal SIGSEGV while running ctypes\.string_at \(a crash in native code\)",
        -signal.SIGSEGV,
    ),
    "os._exit": (None, r"died with exit code 3 while running workerfns\.exit_with\.", 3),
    "SIGKILL": (
        signal.SIGKILL,
        r"died with signal SIGKILL while running workerfns\.record_pid_and_sleep \(killed from outside",
        -signal.SIGKILL,
    ),
    "SIGTERM": (
        signal.SIGTERM,
        r"died with signal SIGTERM while running workerfns\.record_pid_and_sleep "
        r"\(terminated from outside.*KillMode=control-group",
        -signal.SIGTERM,
    ),
}


@pytest.mark.parametrize("death", list(DEATHS))
async def test_worker_death_mid_job_fails_only_its_call(worker_type, death, tmp_path):
    signum, message, exitcode = DEATHS[death]
    limiter = trio.CapacityLimiter(4)
    pid_file = tmp_path / "victim.pid"
    others: dict[int, tuple] = {}
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        with trio.fail_after(HANG):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_others, ctx, limiter, others, 3, 1.0)
                if signum is not None:

                    async def kill_it():
                        signal_descendant(await wait_for_pid_file(pid_file), signum)

                    nursery.start_soon(kill_it)
                with pytest.raises(tpf.BrokenWorkerError, match=message) as info:
                    if death == "segfault":
                        await ctx.run_sync(ctypes.string_at, 0, limiter=limiter)
                    elif death == "os._exit":
                        await ctx.run_sync(workerfns.exit_with, 3, limiter=limiter)
                    else:
                        await ctx.run_sync(workerfns.record_pid_and_sleep, pid_file, 60, limiter=limiter)
        error = info.value
        assert error.exitcode == exitcode
        assert error.signal_name == (signal.Signals(-exitcode).name if exitcode < 0 else None)
        assert error.template_died is False
        assert error.pid is not None and str(error.pid) in str(error)
        if signum is not None:
            assert error.pid == int(pid_file.read_text())
        # The calls running beside it all completed, on other workers.
        check_others(others, 3, {error.pid})
        assert ctx.statistics().retired == {"died": 1}
        # And the next call works.
        assert await ctx.run_sync(workerfns.add, 2, 2) == 4
        assert not wait_until_gone({error.pid}, 5)


async def test_worker_that_dies_in_its_init_fails_the_call_clearly(worker_type):
    """Pitfall 13: a worker dying in its initializer must not strand the job."""
    async with tpf.open_worker_context(worker_type=worker_type, init=functools.partial(os._exit, 4)) as ctx:
        for _ in range(2):
            with trio.fail_after(HANG):
                with pytest.raises(
                    tpf.BrokenWorkerError,
                    match=r"died with exit code 4 while running its init hook, before workerfns\.add",
                ) as info:
                    await ctx.run_sync(workerfns.add, 1, 2)
            assert info.value.exitcode == 4
        assert ctx.statistics().retired == {"died": 2}


# --- a worker dies while idle -------------------------------------------------------------


async def test_idle_worker_killed_from_outside_does_not_fail_the_next_call(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        victim = await ctx.run_sync(workerfns.pid)
        signal_descendant(victim, signal.SIGKILL)
        await wait_dead(victim)
        if worker_type == "forkserver":
            await wait_reaped(victim)
            # The template writes its exit report and closes the status pipe
            # just after reaping; the instant in between is the subject of
            # test_an_exit_report_without_eof_still_marks_an_idle_worker_dead.
            await trio.sleep(0.1)
        else:
            # A process with a second thread (the loopback channel's lifeline)
            # shows as a zombie before its last thread is gone; only then can
            # its parent see the exit.
            with trio.fail_after(HANG):
                while os.waitid(os.P_PID, victim, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:  # noqa: ASYNC110, ASYNC222
                    await trio.sleep(0.005)
        with trio.fail_after(HANG):
            assert await ctx.run_sync(workerfns.pid) != victim


class StatusWriterCopies:
    """Copies of the write end of each worker's status channel the parent
    makes while this watches (the socketpair whose two ends it detaches),
    taken before the parent closes its own: a second writer, as a child the
    template forks at that instant holds one. (A socket cannot be opened
    again through /proc, so the copy is taken as it is made.)"""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._made: list[tuple[socket.socket, socket.socket, int]] = []
        real = socket.socketpair

        def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
            pair = real(*args, **kwargs)
            self._made.append((*pair, os.dup(pair[1].fileno())))
            return pair

        monkeypatch.setattr(socket, "socketpair", recording)

    def status_writers(self) -> list[int]:
        """The copies of status channels' write ends; the others are closed.
        Every other pair keeps an end open here (a channel, the control
        socket); a status channel's two ends are both detached."""
        kept = []
        for ours, theirs, copy in self._made:
            if ours.fileno() == -1 and theirs.fileno() == -1:
                kept.append(copy)
            else:
                os.close(copy)
        self._made.clear()
        return kept


async def test_an_exit_report_without_eof_still_marks_an_idle_worker_dead(monkeypatch):
    """Seen for real in test_idle_worker_killed_from_outside_does_not_fail_the_next_call
    (about 1 run in 3 without its pause, before the fix): the report had
    arrived, the EOF not yet.
    Made deterministic here by holding a second writer on the worker's status
    channel, as a child forked by the template would."""
    async with tpf.open_worker_context() as ctx:
        watch = StatusWriterCopies(monkeypatch)
        victim = await ctx.run_sync(workerfns.pid)
        monkeypatch.undo()
        extra_writer = watch.status_writers()
        assert len(extra_writer) == 1, extra_writer  # the one worker's status channel

        def let_go():
            if extra_writer:
                os.close(extra_writer.pop())

        async def let_go_soon():
            await trio.sleep(0.5)  # as the forked child would, after closing its fds
            let_go()

        try:
            signal_descendant(victim, signal.SIGKILL)
            await wait_reaped(victim)
            await trio.sleep(0.1)  # the exit report is written by now
            with trio.fail_after(HANG):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(let_go_soon)
                    assert await ctx.run_sync(workerfns.pid) != victim
        finally:
            let_go()


async def test_spare_worker_killed_while_idle_is_not_used():
    """The template keeps a worker forked ahead of demand; killed from outside,
    it must not take a job down with it."""
    limiter = trio.CapacityLimiter(3)
    async with tpf.open_worker_context() as ctx:
        first = await ctx.run_sync(workerfns.pid)
        with trio.fail_after(HANG):
            while not (spares := [p for p in worker_processes(ctx) if p.pid != first]):  # noqa: ASYNC110 - polling other processes
                await trio.sleep(0.01)
        for spare in spares:
            signal_descendant(spare.pid, signal.SIGKILL)
            await wait_reaped(spare.pid)
        results = {}
        with trio.fail_after(HANG):
            await run_others(ctx, limiter, results, 3, 0.2)
        check_others(results, 3, {spare.pid for spare in spares})
        assert ctx.statistics().retired == {}


# --- the template dies ------------------------------------------------------------------------


async def test_template_killed_while_jobs_run_fails_them_all_and_restarts(tmp_path):
    limiter = trio.CapacityLimiter(3)
    async with tpf.open_worker_context() as ctx:
        old_template = ctx.statistics().template_pid
        errors = []

        async def doomed():
            with pytest.raises(
                tpf.BrokenWorkerError,
                match=r"the template process died while worker process \d+ was running workerfns\.sleep_and_return",
            ) as info:
                await ctx.run_sync(workerfns.sleep_and_return, 60, limiter=limiter)
            errors.append(info.value)

        with trio.fail_after(HANG):
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(doomed)
                # Until the template has reported the three workers' pids.
                while len(busy_workers(ctx)) < 3:  # noqa: ASYNC110 - polling other processes
                    await trio.sleep(0.01)
                # The three busy workers, and the template's spare if it has one.
                old_children = {p.pid for p in worker_processes(ctx)}
                signal_descendant(old_template, signal.SIGKILL)
        assert len(errors) == 3
        assert all(e.template_died and e.exitcode is None and e.signal_name is None for e in errors)
        assert len({e.pid for e in errors}) == 3 and {e.pid for e in errors} <= old_children
        assert not wait_until_gone(old_children, 5), "workers outlived their template"
        # The next calls start a new template and use it.
        assert await ctx.run_sync(workerfns.add, 1, 2) == 3
        new_template = ctx.statistics().template_pid
        assert new_template not in (None, old_template)
        assert await ctx.run_sync(workerfns.parent_pid) == new_template


async def test_template_killed_while_idle_does_not_fail_later_calls():
    limiter = trio.CapacityLimiter(3)
    async with tpf.open_worker_context() as ctx:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(functools.partial(ctx.run_sync, workerfns.sleep_and_return, 0.3, limiter=limiter))
        assert ctx.statistics().idle_workers == 3
        old_template = ctx.statistics().template_pid
        old_workers = {p.pid for p in worker_processes(ctx)}
        signal_descendant(old_template, signal.SIGKILL)
        await wait_dead(old_template)
        assert not wait_until_gone(old_workers, 5)
        with trio.fail_after(HANG):
            for i in range(4):
                assert await ctx.run_sync(workerfns.add, i, 1) == i + 1
        assert ctx.statistics().template_pid != old_template


async def test_a_call_in_the_instant_a_template_dies_starts_a_new_one():
    """Seen for real (about 1 run in 10 of the SIGTERM test below, when the next
    call came right after the errors, before the fix): the status pipes and control channel of
    a dying template close before the kernel lets its parent reap it, so for
    an instant ``Popen.poll()`` still says it runs. Simulated here by hiding
    the exit from ``poll()``, which is what the parent sees in that instant."""
    async with tpf.open_worker_context() as ctx:
        old_template = ctx.statistics().template_pid
        signal_descendant(old_template, signal.SIGKILL)
        await wait_dead(old_template)
        ctx._pool.backend._template._popen.poll = lambda: None  # white box: the instant
        with trio.fail_after(HANG):
            assert await ctx.run_sync(workerfns.add, 1, 2) == 3
        assert ctx.statistics().template_pid != old_template


# --- SIGTERM from outside (systemd KillMode=control-group) -----------------------------------


async def test_sigterm_to_every_worker_names_sigterm_in_every_call(worker_type, tmp_path):
    limiter = trio.CapacityLimiter(3)
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        errors = []

        async def doomed(i):
            with pytest.raises(tpf.BrokenWorkerError, match="signal SIGTERM.*KillMode=control-group") as info:
                await ctx.run_sync(workerfns.record_pid_and_sleep, tmp_path / f"{i}.pid", 60, limiter=limiter)
            errors.append(info.value)

        with trio.fail_after(HANG):
            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(doomed, i)
                pids = [await wait_for_pid_file(tmp_path / f"{i}.pid") for i in range(3)]
                signal_descendants(pids, signal.SIGTERM)
        assert sorted(e.pid for e in errors) == sorted(pids)
        assert all(e.signal_name == "SIGTERM" and not e.template_died for e in errors)
        assert await ctx.run_sync(workerfns.add, 1, 2) == 3


async def test_sigterm_to_template_and_workers_fails_calls_and_restarts(tmp_path):
    """The whole control group but us gets SIGTERM, template included."""
    limiter = trio.CapacityLimiter(2)
    async with tpf.open_worker_context() as ctx:
        old_template = ctx.statistics().template_pid
        errors = []

        async def doomed(i):
            with pytest.raises(tpf.BrokenWorkerError) as info:
                await ctx.run_sync(workerfns.record_pid_and_sleep, tmp_path / f"{i}.pid", 60, limiter=limiter)
            errors.append(info.value)

        with trio.fail_after(HANG):
            async with trio.open_nursery() as nursery:
                for i in range(2):
                    nursery.start_soon(doomed, i)
                pids = [await wait_for_pid_file(tmp_path / f"{i}.pid") for i in range(2)]
                signal_descendants([old_template, *pids], signal.SIGTERM)
        for error in errors:
            # Either the template reported the SIGTERM, or it died first.
            assert error.signal_name == "SIGTERM" or error.template_died, error
        # Let the old template finish dying: a call made in the instant between
        # its control channel closing and its exit is the subject of
        # test_a_call_in_the_instant_a_template_dies_starts_a_new_one.
        await wait_dead(old_template)
        assert await ctx.run_sync(workerfns.add, 1, 2) == 3
        assert ctx.statistics().template_pid != old_template
        # The old template is reaped (by the restart), its workers are gone.
        assert not wait_until_gone({old_template, *pids}, 5)


# --- cancellation at every checkpoint of run_sync --------------------------------------------


@pytest.mark.parametrize("kill_on_cancel", [False, True])
async def test_cancel_while_waiting_for_the_limiter(worker_type, kill_on_cancel):
    limiter = trio.CapacityLimiter(1)
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        holder_result = []

        async def holder():
            holder_result.append(await ctx.run_sync(workerfns.sleep_and_return, 0.5, "held", limiter=limiter))

        with trio.fail_after(HANG):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(holder)
                while limiter.borrowed_tokens == 0:  # noqa: ASYNC110 - polling other processes
                    await trio.sleep(0.01)
                with trio.move_on_after(0.1) as scope:
                    await ctx.run_sync(workerfns.add, 1, 2, limiter=limiter, kill_on_cancel=kill_on_cancel)
                    raise AssertionError("the waiting call was not cancelled")  # pragma: no cover
                assert scope.cancelled_caught
        assert holder_result == ["held"]
        assert limiter.borrowed_tokens == 0 and limiter.statistics().tasks_waiting == 0
        stats = ctx.statistics()
        assert (stats.started_workers, stats.retired) == (1, {})


def write_slow_module(directory, seconds: float) -> str:
    name = f"slow_preload_{uuid.uuid4().hex[:12]}"
    (directory / f"{name}.py").write_text(f"import time\ntime.sleep({seconds})\n")
    return name


@pytest.mark.parametrize("kill_on_cancel", [False, True])
async def test_cancel_while_the_template_starts(kill_on_cancel, tmp_path, monkeypatch):
    """The template's preload takes a second; the call is cancelled meanwhile."""
    monkeypatch.syspath_prepend(str(tmp_path))
    tpf.configure_default_context(preload=[write_slow_module(tmp_path, 1.0)])
    result = None
    with trio.fail_after(HANG):
        with trio.move_on_after(0.2) as scope:
            result = await tpf.run_sync(workerfns.add, 1, 2, kill_on_cancel=kill_on_cancel)
        assert scope.cancel_called
        if kill_on_cancel:
            assert scope.cancelled_caught and result is None
        else:  # shielded: the call waited for the template and ran the job
            assert result == 3 and not scope.cancelled_caught
        # Either way the context works afterwards, with one template.
        assert await tpf.run_sync(workerfns.add, 2, 2) == 4
    stats = tpf.default_context_statistics()
    assert stats.template_pid is not None
    assert await tpf.run_sync(workerfns.parent_pid) == stats.template_pid
    assert stats.retired == {}


async def test_cancel_while_opening_a_context_whose_template_starts(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    module = write_slow_module(tmp_path, 1.0)
    with trio.fail_after(HANG):
        with trio.move_on_after(0.2) as scope:
            async with tpf.open_worker_context(preload=[module]):
                raise AssertionError("the context opened despite the cancellation")  # pragma: no cover
    assert scope.cancelled_caught
    # The template being started is stopped again: conftest checks nothing is left.


async def test_cancel_while_the_worker_starts_without_kill_returns_the_result(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type, init=functools.partial(time.sleep, 0.5)) as ctx:
        result = None
        with trio.fail_after(HANG):
            with trio.move_on_after(0.05) as scope:
                result = await ctx.run_sync(workerfns.add, 1, 2)
        assert scope.cancel_called and not scope.cancelled_caught
        assert result == 3
        stats = ctx.statistics()
        assert (stats.idle_workers, stats.started_workers, stats.retired) == (1, 1, {})


@pytest.mark.parametrize("kill_on_cancel", [False, True])
async def test_cancel_while_sending_a_large_argument(worker_type, kill_on_cancel):
    """The worker is stopped, so the send blocks on a full socket buffer: the
    call is cancelled in the middle of sending its argument."""
    data = workerfns.pattern(64 * 2**20)
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        worker = await ctx.run_sync(workerfns.pid)
        signal_descendant(worker, signal.SIGSTOP)
        try:
            results = []
            call_scope = trio.CancelScope()

            async def call():
                with call_scope:
                    results.append(await ctx.run_sync(workerfns.length_and_crc, data, kill_on_cancel=kill_on_cancel))
                results.append(("cancelled", call_scope.cancelled_caught))

            with trio.fail_after(HANG):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(call)
                    await trio.sleep(0.3)  # long enough to fill the socket buffer
                    assert results == []  # still sending
                    call_scope.cancel()
                    await trio.sleep(0.1)
                    if not kill_on_cancel:
                        assert results == []  # shielded: still waiting
                        signal_descendant(worker, signal.SIGCONT)
        finally:
            if psutil.pid_exists(worker):
                try:
                    signal_descendant(worker, signal.SIGCONT)
                except (AssertionError, psutil.NoSuchProcess):
                    pass
        if kill_on_cancel:
            assert results == [("cancelled", True)]
            await wait_dead(worker)
            assert ctx.statistics().retired == {"killed": 1}
        else:
            assert results == [workerfns.length_and_crc(data), ("cancelled", False)]
            assert await ctx.run_sync(workerfns.pid) == worker
        assert await ctx.run_sync(workerfns.add, 1, 2) == 3


# --- Ctrl-C ----------------------------------------------------------------------------------

def default_sigint() -> None:
    """In a test's child, before it runs Python: SIGINT as a terminal's shell
    leaves it. A suite started in the background (``cmd &`` in a script)
    inherits SIGINT ignored, and Python then installs no KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


CTRL_C_PARENT = """
import os, sys, time
sys.path.insert(0, {here!r})
import trio, trio_parallel_fs as tpf, workerfns

WORKER_TYPE, CONTEXT = sys.argv[1], sys.argv[2]

async def churn(run_sync):
    i = 0
    while True:
        assert await run_sync(workerfns.add, i, 1) == i + 1
        i += 1

async def main():
    if CONTEXT == "default":
        tpf.configure_default_context(worker_type=WORKER_TYPE)
        await jobs(tpf.run_sync)
    else:
        async with tpf.open_worker_context(worker_type=WORKER_TYPE) as ctx:
            await jobs(ctx.run_sync)

async def jobs(run_sync):
    tpf.current_default_worker_limiter().total_tokens = 4
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: run_sync(workerfns.busy_python, 60, kill_on_cancel=True))
        nursery.start_soon(lambda: run_sync(time.sleep, 60, kill_on_cancel=True))
        nursery.start_soon(churn, run_sync)
        nursery.start_soon(churn, run_sync)
        await trio.sleep(1.0)
        print("ready", flush=True)
        await trio.sleep(60)

try:
    BaseExceptionGroup
except NameError:  # Python 3.10
    from exceptiongroup import BaseExceptionGroup

def leaves(exc):
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]

try:
    trio.run(main)
except BaseException as exc:
    found = leaves(exc)
    print("KI", sum(isinstance(e, KeyboardInterrupt) for e in found), flush=True)
    print("OTHER", [repr(e) for e in found if not isinstance(e, KeyboardInterrupt)], flush=True)
else:
    print("NO EXCEPTION", flush=True)
"""


@pytest.mark.parametrize("context", ["open_worker_context", "default"])
def test_ctrl_c_interrupts_the_parent_once_and_leaves_nothing(worker_type, context, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(CTRL_C_PARENT.format(here=HERE))
    parent = subprocess.Popen(
        [sys.executable, str(script), worker_type, context],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell would make
        preexec_fn=default_sigint,
    )
    descendants: set[int] = set()
    try:
        assert parent.stdout.readline().strip() == "ready"
        descendants = {p.pid for p in psutil.Process(parent.pid).children(recursive=True)}
        assert len(descendants) >= (3 if worker_type == "forkserver" else 2)
        os.killpg(parent.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        out, err = parent.communicate(timeout=HANG)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.communicate()
        for pid in wait_until_gone(descendants, 5):
            psutil.Process(pid).kill()  # a test failure already; do not leak it
    assert parent.returncode == 0, err
    assert out.split("\n")[:2] == ["KI 1", "OTHER []"], (out, err)
    assert "Traceback" not in err, err
    assert not wait_until_gone(descendants, 5)


STARTUP_SITECUSTOMIZE = """
import os, time
marker = os.environ.get("TPF_TEST_STARTUP_MARKER")
if marker:
    with open(f"{marker}.{os.getpid()}", "w"):
        pass
    # Held until the Ctrl-C ends it (the test sends it once it sees the
    # marker); long enough that a loaded machine cannot let it pass first.
    time.sleep(10.0)
"""


BOOT_INTERRUPTED_PARENT = """
import os, sys
sys.path.insert(0, {here!r})
import trio, trio_parallel_fs as tpf, workerfns

# Only the children see the marker: their sitecustomize then holds them in
# their interpreter's start-up for a second.
os.environ["TPF_TEST_STARTUP_MARKER"] = sys.argv[2]

async def main():
    async with tpf.open_worker_context(worker_type=sys.argv[1]) as ctx:
        await ctx.run_sync(workerfns.add, 1, 2, kill_on_cancel=True)
        print("NOT INTERRUPTED", flush=True)

try:
    BaseExceptionGroup
except NameError:  # Python 3.10
    from exceptiongroup import BaseExceptionGroup

def leaves(exc):
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]

try:
    trio.run(main)
except BaseException as exc:
    found = leaves(exc)
    print("KI", sum(isinstance(e, KeyboardInterrupt) for e in found), flush=True)
    print("OTHER", [repr(e) for e in found if not isinstance(e, KeyboardInterrupt)], flush=True)
"""


def test_ctrl_c_while_a_child_interpreter_starts(worker_type, tmp_path):
    """Ctrl-C while the template (forkserver) or a worker (spawn) is still in
    its interpreter's start-up, before its boot code can ignore SIGINT: the
    parent gets one KeyboardInterrupt, the child prints nothing, nothing is
    left. A slow sitecustomize holds the child there deterministically."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(STARTUP_SITECUSTOMIZE)
    script = tmp_path / "parent.py"
    script.write_text(BOOT_INTERRUPTED_PARENT.format(here=HERE))
    marker = tmp_path / "starting"
    parent = subprocess.Popen(
        [sys.executable, str(script), worker_type, str(marker)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(site)},
        start_new_session=True,
        preexec_fn=default_sigint,
    )
    descendants: set[int] = set()
    try:
        deadline = time.monotonic() + HANG
        while not [f for f in os.listdir(tmp_path) if f.startswith("starting.")]:
            assert parent.poll() is None and time.monotonic() < deadline, parent.communicate()
            time.sleep(0.01)
        descendants = {p.pid for p in psutil.Process(parent.pid).children(recursive=True)}
        os.killpg(parent.pid, signal.SIGINT)  # the terminal's Ctrl-C: the parent's group
        out, err = parent.communicate(timeout=HANG)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.communicate()
        for pid in wait_until_gone(descendants, 5):
            psutil.Process(pid).kill()  # a test failure already; do not leak it
    assert out.split("\n")[:2] == ["KI 1", "OTHER []"], (out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert not wait_until_gone(descendants, 5)


# --- shutdown while work is in flight --------------------------------------------------------


async def test_closing_waits_for_a_job_started_outside_the_block(worker_type):
    results = []
    with trio.fail_after(HANG):
        async with trio.open_nursery() as outer:
            async with tpf.open_worker_context(worker_type=worker_type, grace_period=0.1) as ctx:

                async def job():
                    results.append(await ctx.run_sync(workerfns.sleep_and_return, 0.5, "finished"))

                outer.start_soon(job)
                while ctx.statistics().running_workers == 0:  # noqa: ASYNC110 - polling other processes
                    await trio.sleep(0.01)
            # The block exited only once the job was done, and without error.
            assert results == ["finished"]


async def test_cancelling_a_job_outside_the_block_lets_the_close_finish(worker_type):
    with trio.fail_after(HANG):
        async with trio.open_nursery() as outer:
            async with tpf.open_worker_context(worker_type=worker_type) as ctx:
                outer.start_soon(functools.partial(ctx.run_sync, time.sleep, 60, kill_on_cancel=True))
                while ctx.statistics().running_workers == 0:  # noqa: ASYNC110 - polling other processes
                    await trio.sleep(0.01)
                outer.cancel_scope.cancel()
            assert ctx.statistics().retired == {"killed": 1}


async def test_grace_period_then_kill_for_a_worker_that_cannot_exit(worker_type):
    """A stopped worker cannot act on the EOF that tells it to leave."""
    with trio.fail_after(HANG):
        with pytest.raises(
            tpf.BrokenWorkerError,
            match=r"1 worker\(s\) \(pid (\d+)\) did not exit within grace_period=0.3s after their context closed, "
            r"and were killed",
        ) as info:
            async with tpf.open_worker_context(worker_type=worker_type, grace_period=0.3) as ctx:
                worker = await ctx.run_sync(workerfns.pid)
                signal_descendant(worker, signal.SIGSTOP)
    assert f"pid {worker})" in str(info.value)
    assert not wait_until_gone({worker}, 5)


ATEXIT_PARENT = """
import os, sys, threading, time
sys.path.insert(0, {here!r})
import psutil, trio, trio_parallel_fs as tpf, workerfns

tpf.configure_default_context(worker_type=sys.argv[1], grace_period=1)
EXPECTED = 2 if sys.argv[1] == "forkserver" else 1  # (template and) one worker
# A daemon thread runs a long job in the default context; the main thread
# returns, so the interpreter shuts the default context down under it.
threading.Thread(target=trio.run, args=(tpf.run_sync, workerfns.sleep_and_return, 60), daemon=True).start()
while len(psutil.Process().children(recursive=True)) < EXPECTED:
    time.sleep(0.01)
time.sleep(0.5)
print(" ".join(str(p.pid) for p in psutil.Process().children(recursive=True)), flush=True)
"""


@pytest.mark.parametrize(
    "worker_type",
    [
        "forkserver",
        "spawn",
    ],
)
def test_parent_exit_with_a_job_running_in_a_thread_leaves_nothing(worker_type, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(ATEXIT_PARENT.format(here=HERE))
    # Files, not pipes: an orphaned worker would hold a pipe open, and reading
    # it to EOF would wait for the orphan.
    out_path, err_path = tmp_path / "out", tmp_path / "err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        subprocess.run([sys.executable, str(script), worker_type], stdout=out, stderr=err, timeout=HANG)
    pids = {int(pid) for pid in out_path.read_text().split()}
    try:
        assert pids, err_path.read_text()
        left = wait_until_gone(pids, 5)
        assert not left, f"still running after the parent exited: {left}"
    finally:
        # Orphans are no longer our descendants, but we started them: clean up.
        for pid in wait_until_gone(pids, 0):
            try:
                process = psutil.Process(pid)
                if "_trio_parallel_fs_worker" in " ".join(process.cmdline()):
                    process.kill()
            except psutil.Error:
                pass


async def test_a_worker_killed_while_idle_before_its_death_is_reported_does_not_fail_the_next_call(monkeypatch):
    """Before: an idle worker killed from outside (kill -9, the OOM killer)
    whose template had not reaped and reported it yet was given the next job;
    sending it failed, and the call raised BrokenWorkerError for a job that
    never ran (seen as a rare failure of the stress test). Now the job goes to
    another worker, and the death is counted."""
    async with tpf.open_worker_context(worker_type="forkserver") as ctx:
        first = await ctx.run_sync(workerfns.pid)
        (idle,) = ctx._pool._idle
        monkeypatch.setattr(idle.process, "has_exited", lambda: False)  # white box: not reported yet
        os.kill(first, signal.SIGKILL)
        await wait_dead(first)
        second = await ctx.run_sync(workerfns.pid)
        assert second != first
        assert ctx.statistics().retired["died"] == 1


async def test_a_new_worker_that_dies_before_its_first_job_still_fails_the_call():
    """The job is not handed on and on to workers that die at start."""
    async with tpf.open_worker_context(worker_type="forkserver", init=functools.partial(workerfns.exit_with, 3)) as ctx:
        with pytest.raises(tpf.BrokenWorkerError):
            await ctx.run_sync(workerfns.add, 1, 2)
