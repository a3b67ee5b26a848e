"""The contract under both event loops, and what only asyncio has.

The contract tests are sync tests that run their body with ``run`` (conftest's
fixture over Trio, asyncio and uvloop where it is installed, through ``anyio.run``): they use anyio for sleeping,
cancelling and starting tasks, which means the same on both, and assert the
same results, errors, worker deaths, limiters, contexts and transfers. Where
the loops' rules differ (a shielded call under asyncio raises the
cancellation once its job has ended; Trio delivers it at the next
checkpoint) each test says what each loop does.

The asyncio-only tests use asyncio itself: ``asyncio.run``, ``task.cancel()``,
``asyncio.wait_for``, ``asyncio.timeout``, TaskGroup; and programs run in a
subprocess for Ctrl-C, SIGKILL and the exit with an open default context.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import textwrap
import threading

import anyio
import psutil
import pytest
import trio
import workerfns
from conftest import HERE, wait_until_gone

import trio_parallel_fs as tpf

HANG = 30


def cancellation(loop: str) -> type[BaseException]:
    return trio.Cancelled if loop == "trio" else asyncio.CancelledError


# --- the contract, under both loops ---------------------------------------------------------


def test_results_and_job_errors(run):
    async def main():
        assert await tpf.run_sync(workerfns.add, 1, 2) == 3
        with pytest.raises(ValueError, match="^boom$") as caught:
            await tpf.run_sync(workerfns.raise_value_error, "boom")
        chain = []
        exc = caught.value
        while exc is not None:
            chain.append(exc)
            exc = exc.__cause__
        assert isinstance(chain[-1], tpf.RemoteTraceback)
        assert "raise_value_error" in str(chain[-1])
        with pytest.raises(TypeError, match="keyword arguments for the job"):
            await tpf.run_sync(workerfns.add, 1, b=2)

    run(main)


def test_worker_death_is_a_broken_worker_error_and_the_next_call_works(run, worker_type):
    async def main():
        async with tpf.open_worker_context(worker_type=worker_type) as ctx:
            with pytest.raises(tpf.BrokenWorkerError, match="died with exit code 7 while running workerfns.exit_with"):
                await ctx.run_sync(workerfns.exit_with, 7)
            assert await ctx.run_sync(workerfns.add, 2, 2) == 4
            assert ctx.statistics().retired == {"died": 1}

    run(main)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="as tests/test_reliability.py: a fork at C level")
def test_a_death_is_seen_while_a_process_the_worker_forked_holds_its_channel(run, tmp_path):
    """The wait through the loop also returns once the worker's exit is
    reported (a helper in its own session keeps the channel open): under
    asyncio and uvloop as under Trio."""
    import reliabilityfns

    pid_file = tmp_path / "helper.pid"

    async def main():
        async with tpf.open_worker_context() as ctx:
            await ctx.run_sync(workerfns.add, 1, 2)  # a warm worker: its start is confirmed
            try:
                with anyio.fail_after(10):
                    with pytest.raises(tpf.BrokenWorkerError, match="died with exit code 3 while running"):
                        await ctx.run_sync(
                            reliabilityfns.c_fork_helper_then_exit, pid_file, 20, True, kill_on_cancel=True
                        )
            finally:
                if pid_file.exists():
                    # Ours: it wrote its pid and sleeps, in a session of its
                    # own. Killed while the template (its subreaper) lives to reap it.
                    helper = int(pid_file.read_text())
                    os.kill(helper, signal.SIGKILL)
                    assert await anyio.to_thread.run_sync(wait_until_gone, {helper}, 10) == set()

    run(main)


def test_a_shielded_call_in_a_cancelled_scope_waits_without_spinning(run):
    """anyio's cancelled scopes cancel the task again on every loop pass;
    the shielded wait used to take each of them and wait again, spinning a
    CPU until the job ended (1.4 s of CPU for a 1.5 s job). The bound is far
    from both: a blocked wait takes next to no CPU, a spinning one all of it."""
    import time

    async def main():
        async with tpf.open_worker_context() as ctx:
            await ctx.run_sync(workerfns.add, 1, 2)
            cpu = time.process_time()
            with anyio.move_on_after(0.1) as scope:
                await ctx.run_sync(time.sleep, 1.5)
            assert scope.cancel_called
            return time.process_time() - cpu

    assert run(main) < 0.5


def test_cancel_without_kill_lets_the_job_run_to_its_end(run, tmp_path):
    """Under Trio the call returns its result and the cancellation waits for
    the next checkpoint; under asyncio the cancellation is raised when the job
    has ended. Either way the worker is kept."""

    async def main():
        async with tpf.open_worker_context() as ctx:
            first = await ctx.run_sync(workerfns.pid)
            result = None
            with anyio.move_on_after(0.2) as scope:
                result = await ctx.run_sync(workerfns.record_pid_and_sleep, str(tmp_path / "ran"), 0.6, "done")
            assert scope.cancel_called
            if run.loop == "trio":
                assert result == "done" and not scope.cancelled_caught
            else:
                assert result is None and scope.cancelled_caught
            assert (tmp_path / "ran").read_text() == str(first)  # the job ran, on the kept worker
            assert await ctx.run_sync(workerfns.pid) == first
            assert ctx.statistics().retired == {}

    run(main)


def test_cancel_with_kill_on_cancel_kills_the_worker_at_once(run, worker_type, tmp_path):
    async def main():
        async with tpf.open_worker_context(worker_type=worker_type) as ctx:
            marker = tmp_path / "pid"
            with anyio.fail_after(HANG):  # the job sleeps far longer: only the kill ends it in time
                async with anyio.create_task_group() as group:

                    async def call():
                        await ctx.run_sync(workerfns.record_pid_and_sleep, str(marker), 60, kill_on_cancel=True)

                    group.start_soon(call)
                    while not marker.exists():  # noqa: ASYNC110 - the worker says it started
                        await anyio.sleep(0.01)
                    group.cancel_scope.cancel()
            assert not wait_until_gone({int(marker.read_text())}, 5)
            assert ctx.statistics().retired == {"killed": 1}
            assert await ctx.run_sync(workerfns.add, 1, 1) == 2

    run(main)


def test_a_call_in_a_cancelled_scope_starts_nothing(run):
    async def main():
        async with tpf.open_worker_context() as ctx:
            with anyio.CancelScope() as scope:
                scope.cancel()
                await ctx.run_sync(workerfns.add, 1, 2)
            assert scope.cancelled_caught
            assert ctx.statistics().started_workers == 0

    run(main)


def test_the_default_limiter_is_one_per_run_of_the_loops_own_kind(run):
    async def limiter():
        first = tpf.current_default_worker_limiter()
        assert tpf.current_default_worker_limiter() is first
        return first

    one, two = run(limiter), run(limiter)
    assert one is not two
    assert one.total_tokens == two.total_tokens >= 1
    if run.loop == "trio":
        assert type(one) is trio.CapacityLimiter
    else:
        assert isinstance(one, anyio.CapacityLimiter)


# The limiters each loop accepts (a Trio limiter under asyncio is refused:
# test_a_trio_limiter_under_asyncio_is_refused; asyncio.Semaphore is asyncio's).
LIMITER_KINDS = {"trio": ["trio", "anyio", "default"], "asyncio": ["anyio", "semaphore", "default"]}


@pytest.mark.parametrize("which", range(3))
def test_a_limiter_of_one_token_runs_one_job_at_a_time(run, which):
    kind = LIMITER_KINDS[run.loop][which]

    async def main():
        limiter = {
            "trio": lambda: trio.CapacityLimiter(1),
            "anyio": lambda: anyio.CapacityLimiter(1),
            "semaphore": lambda: asyncio.Semaphore(1),
            "default": lambda: None,
        }[kind]()
        if limiter is None:
            tpf.current_default_worker_limiter().total_tokens = 1
        async with tpf.open_worker_context() as ctx:
            results = []

            async def call(i):
                results.append(await ctx.run_sync(workerfns.tagged, i, 0.05, limiter=limiter))

            async with anyio.create_task_group() as group:
                for i in range(4):
                    group.start_soon(call, i)
            assert sorted(r[1] for r in results) == [0, 1, 2, 3]
            # One at a time: one worker served them all.
            assert len({r[3] for r in results}) == 1
            assert ctx.statistics().started_workers == 1

    run(main)


def test_contexts_recycling_and_statistics(run):
    async def main():
        async with tpf.open_worker_context(max_jobs=1) as ctx:
            pids = [await ctx.run_sync(workerfns.pid) for _ in range(3)]
            assert len(set(pids)) == 3
            assert ctx.statistics().retired == {"jobs": 3}
        with pytest.raises((trio.ClosedResourceError, anyio.ClosedResourceError), match="closed") as caught:
            await ctx.run_sync(workerfns.add, 1, 2)
        expected = trio.ClosedResourceError if run.loop == "trio" else anyio.ClosedResourceError
        assert type(caught.value) is expected

        async with tpf.cache_scope(max_jobs=2):
            scoped = [await tpf.run_sync(workerfns.pid) for _ in range(4)]
            assert len(set(scoped)) == 2
            assert tpf.default_context_statistics().retired == {"jobs": 2}
        tpf.configure_default_context(max_jobs=1)
        assert await tpf.run_sync(workerfns.pid) != await tpf.run_sync(workerfns.pid)
        assert tpf.default_context_statistics().retired == {"jobs": 2}

    run(main)


def test_big_arrays_both_ways(run, worker_type):
    np = pytest.importorskip("numpy")
    from _trio_parallel_fs_worker._shm import unsupported_reason
    from trio_parallel_fs._backends.spawn.backend import channel_kind

    # Through the shared memory area where workers get one (see conftest.area_worker_type).
    through_area = unsupported_reason() is None and (worker_type == "forkserver" or channel_kind() != "loopback")

    async def main():
        array = np.arange(4 << 20, dtype=np.float64)  # 32 MB
        async with tpf.open_worker_context(worker_type=worker_type) as ctx:
            back = await ctx.run_sync(functools.partial(np.multiply, 2), array)
            assert back.shape == array.shape and back[-1] == 2 * array[-1] and back.sum() == 2 * array.sum()
            assert (ctx.statistics().shared_memory_bytes > 0) == through_area

    run(main)


# --- asyncio's own ways -----------------------------------------------------------------------


def test_task_cancel_without_kill_raises_when_the_job_ends(tmp_path):
    async def main():
        async with tpf.open_worker_context() as ctx:
            first = await ctx.run_sync(workerfns.pid)
            task = asyncio.create_task(ctx.run_sync(workerfns.record_pid_and_sleep, str(tmp_path / "ran"), 0.5))
            await asyncio.sleep(0.1)
            task.cancel()
            task.cancel()  # twice: still one CancelledError, after the job
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (tmp_path / "ran").read_text() == str(first)
            assert ctx.statistics().retired == {}
            assert await ctx.run_sync(workerfns.pid) == first

    asyncio.run(main())


def test_a_task_cancelled_while_its_shielded_call_fails_ends_cancelled():
    """The cancel held off while the job ran is not lost when the call fails
    instead of returning: the task ends cancelled, the call's error as the
    cause (before, the BrokenWorkerError went out and the cancel was gone)."""

    async def main():
        async with tpf.open_worker_context() as ctx:
            await ctx.run_sync(workerfns.add, 1, 2)
            task = asyncio.create_task(ctx.run_sync(workerfns.sleep_then_exit, 0.5, 3))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError) as caught:
                await task
            assert isinstance(caught.value.__cause__, tpf.BrokenWorkerError)
            assert task.cancelled()

    asyncio.run(main())


def test_a_shielded_wait_woken_right_after_a_cancel_still_ends():
    """A cancel inside a shield ends the future the task awaits; the wait goes
    on with a new one. An event that comes in between (here: before the task
    even sees its cancel) is noted, not lost: the wait ends, and the cancel is
    raised as the shield is left."""
    from trio_parallel_fs._loops import asyncio_loop

    async def main():
        lot = asyncio_loop.ParkingLot()
        parked = asyncio.Event()

        async def park_shielded():
            with asyncio_loop.CancelScope(shield=True):
                parked.set()
                await lot.park()

        task = asyncio.create_task(park_shielded())
        await parked.wait()
        task.cancel()
        lot.unpark_all()
        done, _ = await asyncio.wait({task}, timeout=HANG)
        assert done == {task}
        assert task.cancelled()

    asyncio.run(main())


def test_a_loop_closed_while_its_gone_watch_is_due_is_not_kept_alive():
    """The gone-peer watch's next look is due when this loop closes; the
    watch, kept per loop in a weak mapping, must not keep the loop alive."""
    import gc
    import socket
    import weakref

    from trio_parallel_fs._loops import asyncio_loop

    ours, theirs = socket.socketpair()
    loops = []

    async def main():
        loops.append(weakref.ref(asyncio.get_running_loop()))
        theirs.send(b"x")
        await asyncio_loop.wait_readable_or_gone(ours, lambda: False)  # its look is due in 0.25 s

    try:
        asyncio.run(main())
    finally:
        ours.close()
        theirs.close()
    gc.collect()
    assert loops[0]() is None


def test_a_cancel_while_a_dead_workers_exit_is_awaited_still_lets_the_worker_go(monkeypatch, worker_type):
    """With kill_on_cancel, a call whose worker died waits, shielded, for the
    worker's exit report; a cancel that comes meanwhile is raised as that
    shield is left (asyncio's rule), and the worker is let go and counted all
    the same (before, the bookkeeping after the shield was skipped: the dead
    worker stayed among the live ones, its channel open, its death uncounted)."""
    from trio_parallel_fs import _loops

    async def main():
        async with tpf.open_worker_context(worker_type=worker_type) as ctx:
            await ctx.run_sync(workerfns.add, 1, 2)
            (worker,) = ctx._pool._live
            process_type = type(worker.process)  # the backend's
            real_wait = process_type.wait

            async def wait_cancelled(self):
                asyncio.current_task().cancel()
                await _loops.checkpoint()  # inside the shield: held off, raised as it is left
                return await real_wait(self)

            with monkeypatch.context() as patch:
                patch.setattr(process_type, "wait", wait_cancelled)
                task = asyncio.create_task(ctx.run_sync(workerfns.exit_with, 7, kill_on_cancel=True))
                with pytest.raises(asyncio.CancelledError) as caught:
                    await task
            assert isinstance(caught.value.__cause__, tpf.BrokenWorkerError)
            statistics = ctx.statistics()
            assert statistics.retired == {"died": 1}
            assert statistics.running_workers == 0
            assert ctx._pool.worker_pids() == []  # the dead worker is not held as live
            assert await ctx.run_sync(workerfns.add, 2, 2) == 4

    asyncio.run(asyncio.wait_for(main(), HANG))


@pytest.mark.parametrize("how", ["wait_for", "timeout"])
def test_timeouts_with_kill_on_cancel_kill_the_worker(how, tmp_path):
    if how == "timeout" and sys.version_info < (3, 11):
        pytest.skip("asyncio.timeout is Python 3.11+")

    async def main():
        async with tpf.open_worker_context() as ctx:
            marker = tmp_path / "pid"
            call = ctx.run_sync(workerfns.record_pid_and_sleep, str(marker), 60, "late", kill_on_cancel=True)
            with pytest.raises(TimeoutError):
                if how == "wait_for":
                    await asyncio.wait_for(call, 0.5)
                else:
                    async with asyncio.timeout(0.5):
                        await call
            assert not wait_until_gone({int(marker.read_text())}, 5)
            assert ctx.statistics().retired == {"killed": 1}
            # Without kill_on_cancel the job ends first; the timeout still counts.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ctx.run_sync(workerfns.sleep_and_return, 0.3), 0.05)
            assert ctx.statistics().retired == {"killed": 1}

    asyncio.run(asyncio.wait_for(main(), HANG))


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.TaskGroup is Python 3.11+")
def test_a_failing_task_group_kills_or_waits_by_kill_on_cancel(tmp_path):
    async def main():
        async with tpf.open_worker_context() as ctx:
            killed, waited = tmp_path / "killed", tmp_path / "waited"

            async def fail_soon():
                while not (killed.exists() and waited.exists()):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                raise LookupError("the sibling failed")

            with pytest.raises(ExceptionGroup) as caught:  # noqa: F821 - Python 3.11+
                async with asyncio.TaskGroup() as group:
                    record = workerfns.record_pid_and_sleep
                    group.create_task(ctx.run_sync(record, str(killed), 60, kill_on_cancel=True))
                    group.create_task(ctx.run_sync(record, str(waited), 0.5))
                    group.create_task(fail_soon())
            assert [type(e) for e in caught.value.exceptions] == [LookupError]
            assert not wait_until_gone({int(killed.read_text())}, 5)
            assert ctx.statistics().retired == {"killed": 1}
            assert ctx.statistics().idle_workers == 1  # the waited-for one, kept

    asyncio.run(asyncio.wait_for(main(), HANG))


def test_a_trio_limiter_under_asyncio_is_refused():
    async def main():
        with pytest.raises(TypeError, match="a Trio object works only inside trio.run"):
            await tpf.run_sync(workerfns.add, 1, 2, limiter=trio.CapacityLimiter(1))

    asyncio.run(main())


def test_loops_in_threads_share_the_default_context_each_with_its_limiter():
    found = {}

    def in_thread(name):
        async def main():
            found[name] = (
                tpf.current_default_worker_limiter(),
                await tpf.run_sync(workerfns.parent_pid),
                tpf.default_context_statistics().template_pid,
            )

        asyncio.run(main())

    threads = [threading.Thread(target=in_thread, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG)
    (limiter_a, parent_a, template_a), (limiter_b, parent_b, template_b) = found["a"], found["b"]
    assert limiter_a is not limiter_b
    # One default context for the process: its template (if any) forked both workers.
    assert parent_a == parent_b and template_a == template_b
    assert parent_a == (template_a if template_a is not None else os.getpid())


def run_program(source: str, *args: str, **popen) -> subprocess.Popen[str]:
    script = textwrap.dedent(source).replace("HERE", repr(HERE))
    return subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def test_an_asyncio_program_that_maps_never_imports_trio_and_leaves_nothing_at_exit():
    program = run_program(
        """
        import asyncio, sys
        sys.path.insert(0, HERE)
        import trio_parallel_fs as tpf, workerfns

        async def main():
            worker = await tpf.run_sync(workerfns.pid)
            assert await tpf.map(workerfns.add, range(3), range(3)) == [0, 2, 4]
            async with tpf.imap(workerfns.add, range(3), range(3)) as results:
                assert [result async for result in results] == [0, 2, 4]
            print(worker, tpf.default_context_statistics().template_pid, "trio" in sys.modules, flush=True)

        asyncio.run(main())  # the loop closes with the default context open
        """
    )
    out, err = program.communicate(timeout=HANG)
    assert program.returncode == 0, err
    worker, template, trio_imported = out.split()
    assert trio_imported == "False"
    assert not wait_until_gone({int(pid) for pid in (worker, template) if pid != "None"}, 5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="as tests/test_reliability.py: a fork at C level")
def test_a_loop_without_add_reader_waits_through_anyio_and_still_sees_a_death(tmp_path):
    """Windows' proactor loop has no add_reader: there the waits go through
    anyio's (and its selector thread). They too return once the worker's exit
    is reported while a process it forked holds its channel open (before, only
    the add_reader path watched for that: this call hung). A loop of our own
    refuses add_reader as the proactor does (the platform view keeps asyncio's
    Linux loop), in a program of its own (anyio's selector thread lives until
    exit)."""
    program = run_program(
        """
        import asyncio, os, signal, sys
        sys.path.insert(0, HERE)
        import reliabilityfns, workerfns
        import trio_parallel_fs as tpf

        class NoReaderLoop(asyncio.SelectorEventLoop):
            def add_reader(self, *args):
                raise NotImplementedError

            def add_writer(self, *args):
                raise NotImplementedError

        async def main(pid_file):
            async with tpf.open_worker_context() as ctx:
                assert await ctx.run_sync(workerfns.add, 1, 2) == 3
                job = reliabilityfns.c_fork_helper_then_exit
                try:
                    await asyncio.wait_for(ctx.run_sync(job, pid_file, 20, True, kill_on_cancel=True), 10)
                except tpf.BrokenWorkerError as exc:
                    print(exc, flush=True)
                finally:
                    if os.path.exists(pid_file):
                        os.kill(int(open(pid_file).read()), signal.SIGKILL)
                assert await ctx.run_sync(workerfns.add, 2, 2) == 4

        loop = NoReaderLoop()
        try:
            loop.run_until_complete(main(sys.argv[1]))
        finally:
            loop.close()
        """,
        str(tmp_path / "helper.pid"),
    )
    out, err = program.communicate(timeout=HANG)
    assert program.returncode == 0, err
    assert "died with exit code 3 while running" in out, out
    helper = int((tmp_path / "helper.pid").read_text())
    assert not wait_until_gone({helper}, 10)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="as test_lifecycle.py: parent death signal")
def test_an_asyncio_program_killed_while_its_jobs_run_leaves_nothing(worker_type):
    program = run_program(
        """
        import asyncio, sys, time
        sys.path.insert(0, HERE)
        import trio_parallel_fs as tpf, workerfns

        async def main():
            async with tpf.open_worker_context(worker_type=sys.argv[1]) as ctx:
                tpf.configure_default_context(worker_type=sys.argv[1])
                tpf.current_default_worker_limiter().total_tokens = 4
                async with asyncio.TaskGroup() as group:
                    group.create_task(ctx.run_sync(workerfns.busy_python, 60))
                    group.create_task(ctx.run_sync(time.sleep, 60))
                    group.create_task(tpf.run_sync(time.sleep, 60, kill_on_cancel=True))
                    await asyncio.sleep(1.0)
                    print("ready", flush=True)
                    await asyncio.sleep(60)

        asyncio.run(main())
        """,
        worker_type,
    )
    try:
        assert program.stdout.readline().strip() == "ready", program.stderr.read()
        descendants = {p.pid for p in psutil.Process(program.pid).children(recursive=True)}
        # forkserver: two templates, three workers, the spares; spawn: three workers
        assert len(descendants) >= (5 if worker_type == "forkserver" else 3)
        program.kill()
        program.wait()
        assert not wait_until_gone(descendants, 5.0)
    finally:
        program.kill()
        program.communicate()


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # see test_faults.default_sigint


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="as tests/test_faults.py: process groups and signals")
def test_ctrl_c_ends_an_asyncio_program_with_keyboard_interrupt_and_no_worker_traceback(worker_type):
    program = run_program(
        """
        import asyncio, sys, time
        sys.path.insert(0, HERE)
        import trio_parallel_fs as tpf, workerfns

        async def churn():
            i = 0
            while True:
                assert await tpf.run_sync(workerfns.add, i, 1) == i + 1
                i += 1

        async def main():
            tpf.configure_default_context(worker_type=sys.argv[1])
            tpf.current_default_worker_limiter().total_tokens = 4
            async with asyncio.TaskGroup() as group:
                group.create_task(tpf.run_sync(workerfns.busy_python, 60, kill_on_cancel=True))
                group.create_task(tpf.run_sync(time.sleep, 60, kill_on_cancel=True))
                group.create_task(churn())
                group.create_task(churn())
                await asyncio.sleep(1.0)
                print("ready", flush=True)
                await asyncio.sleep(60)

        try:
            asyncio.run(main())
        except KeyboardInterrupt:
            print("KeyboardInterrupt", flush=True)
        """,
        worker_type,
        start_new_session=True,
        preexec_fn=default_sigint,
    )
    descendants: set[int] = set()
    try:
        assert program.stdout.readline().strip() == "ready", program.stderr.read()
        descendants = {p.pid for p in psutil.Process(program.pid).children(recursive=True)}
        os.killpg(program.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        out, err = program.communicate(timeout=HANG)
    finally:
        if program.poll() is None:
            program.kill()
            program.communicate()
        for pid in wait_until_gone(descendants, 5):
            psutil.Process(pid).kill()  # a test failure already; do not leak it
    assert program.returncode == 0, err
    assert out.strip() == "KeyboardInterrupt", (out, err)
    assert "Traceback" not in err, err
    assert not wait_until_gone(descendants, 5)
