"""Cancellation, the default context across runs, shutdown, parent death, hooks."""

from __future__ import annotations

import sys

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("needs Linux: parent death (PR_SET_PDEATHSIG) and POSIX signals", allow_module_level=True)

import math
import os
import signal
import subprocess
import textwrap
import threading
import time

import psutil
import trio
import workerfns
from conftest import wait_until_gone

import trio_parallel_fs as tpf

# --- cancellation -------------------------------------------------------------


async def test_entry_is_a_checkpoint():
    with trio.CancelScope() as scope:
        scope.cancel()
        await tpf.run_sync(workerfns.add, 1, 2)
        raise AssertionError("run_sync did not raise Cancelled")  # pragma: no cover
    assert scope.cancelled_caught
    assert tpf.default_context_statistics().started_workers == 0


async def test_without_kill_on_cancel_the_job_is_shielded(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        await ctx.run_sync(workerfns.add, 1, 2)  # start the worker outside the timing
        result = None
        with trio.move_on_after(0.1) as scope:
            result = await ctx.run_sync(workerfns.sleep_and_return, 0.5, "done")
        assert result == "done"
        assert scope.cancel_called
        stats = ctx.statistics()
        assert (stats.idle_workers, stats.started_workers) == (1, 1)


@pytest.mark.parametrize("keyword", ["kill_on_cancel", "cancellable"])
async def test_kill_on_cancel_kills_the_worker(worker_type, keyword):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        worker = await ctx.run_sync(workerfns.pid)
        start = trio.current_time()
        with trio.move_on_after(0.2) as scope:
            await ctx.run_sync(workerfns.sleep_and_return, 30, **{keyword: True})
        assert scope.cancelled_caught
        assert trio.current_time() - start < 10
        assert not wait_until_gone({worker}, 5)
        assert ctx.statistics().retired == {"killed": 1}
        assert await ctx.run_sync(workerfns.pid) != worker


async def test_kill_on_cancel_stops_a_busy_loop_in_python_and_in_c(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        for fn, arg in [(workerfns.busy_python, 30), (time.sleep, 30)]:
            with trio.move_on_after(0.3) as scope:
                await ctx.run_sync(fn, arg, kill_on_cancel=True)
            assert scope.cancelled_caught


async def test_cancel_while_the_worker_is_being_started(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type, init=lambda: time.sleep(0.5)) as ctx:
        with trio.move_on_after(0.05) as scope:
            await ctx.run_sync(workerfns.add, 1, 2, kill_on_cancel=True)
        assert scope.cancelled_caught
        assert ctx.statistics().retired == {"killed": 1}
        assert ctx.statistics().idle_workers == 0


async def test_cancel_while_waiting_for_the_limiter():
    limiter = trio.CapacityLimiter(1)
    async with tpf.open_worker_context() as ctx:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: ctx.run_sync(workerfns.sleep_and_return, 0.3, limiter=limiter))
            await trio.sleep(0.05)
            with trio.move_on_after(0.05) as scope:
                await ctx.run_sync(workerfns.add, 1, 2, limiter=limiter)
            assert scope.cancelled_caught
        assert ctx.statistics().started_workers == 1


# --- the default context --------------------------------------------------------


def test_default_context_outlives_trio_run():
    first = trio.run(tpf.run_sync, workerfns.pid)
    second = trio.run(tpf.run_sync, workerfns.pid)
    assert first == second


def test_default_context_is_shared_by_concurrent_runs_in_threads():
    results = []
    errors = []

    def run_in_thread(i):
        try:
            results.append(trio.run(tpf.run_sync, workerfns.add, i, 1))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run_in_thread, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert sorted(results) == [1, 2, 3, 4]
    assert tpf.default_context_statistics().started_workers <= 4


async def test_configure_default_context_applies_and_replaces_workers():
    first = await tpf.run_sync(workerfns.pid)
    tpf.configure_default_context(max_jobs=1)
    assert not wait_until_gone({first}, 5)
    a = await tpf.run_sync(workerfns.pid)
    b = await tpf.run_sync(workerfns.pid)
    assert first != a != b


async def test_cache_scope_overrides_the_default_for_its_tasks():
    default_worker = await tpf.run_sync(workerfns.pid)
    async with tpf.cache_scope(max_jobs=1):
        scoped = await tpf.run_sync(workerfns.pid)
        assert scoped != default_worker
        assert await tpf.run_sync(workerfns.pid) != scoped  # max_jobs=1 applies
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tpf.run_sync, workerfns.add, 1, 2)
    assert await tpf.run_sync(workerfns.pid) == default_worker


def run_script(source: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=os.path.dirname(__file__),
    )


def test_default_context_is_shut_down_at_interpreter_exit():
    done = run_script(
        """
        import trio, trio_parallel_fs as tpf
        def where():
            import os
            return os.getpid()
        async def main():
            print(await tpf.run_sync(where), tpf.default_context_statistics().template_pid)
        trio.run(main)
        """
    )
    assert done.returncode == 0, done.stderr
    pids = {int(pid) for pid in done.stdout.split()}
    assert len(pids) == 2
    assert not wait_until_gone(pids, 5)


def test_a_function_defined_in_main_runs():
    done = run_script(
        """
        import trio, trio_parallel_fs as tpf
        def square(x):
            return x * x
        print(trio.run(tpf.run_sync, square, 7))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "49"


@pytest.mark.parametrize("worker_type", ["forkserver", "spawn"])
def test_parent_killed_takes_template_and_busy_workers_along(worker_type, tmp_path):
    """SIGKILL the parent while workers spin in Python and in C: all gone in 2 s."""
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys, time, trio, trio_parallel_fs as tpf
            sys.path.insert(0, {os.path.dirname(__file__)!r})
            import workerfns

            async def main():
                async with tpf.open_worker_context(worker_type={worker_type!r}) as ctx:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(ctx.run_sync, workerfns.busy_python, 60)
                        nursery.start_soon(ctx.run_sync, time.sleep, 60)
                        await trio.sleep(1.0)
                        print("ready", flush=True)
                        await trio.sleep(60)
            trio.run(main)
            """
        )
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "ready"
        descendants = {p.pid for p in psutil.Process(parent.pid).children(recursive=True)}
        # forkserver: the template, two workers and the template's spare
        assert len(descendants) == (4 if worker_type == "forkserver" else 2)
        parent.kill()
        parent.wait()
        assert not wait_until_gone(descendants, 2.0)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


# --- hooks and idle timeout ---------------------------------------------------------


async def test_init_runs_once_per_worker(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type, init=workerfns.count_calls) as ctx:
        # init counted 1; each job counts one more on the same worker
        assert await ctx.run_sync(workerfns.count_calls) == 2
        assert await ctx.run_sync(workerfns.count_calls) == 3


async def test_init_that_raises_fails_the_call_that_started_the_worker(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type, init=workerfns.init_raises) as ctx:
        with pytest.raises(tpf.WorkerHookError, match="init hook raised RuntimeError: init failed on purpose") as info:
            await ctx.run_sync(workerfns.add, 1, 2)
        assert info.value.hook == "init"
        assert isinstance(info.value.__cause__, RuntimeError)
        assert ctx.statistics().retired == {"hook_error": 1}


async def test_retire_hook_retires_after_the_job(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type, retire=lambda: True) as ctx:
        first = await ctx.run_sync(workerfns.pid)
        second = await ctx.run_sync(workerfns.pid)
        assert first != second
        assert ctx.statistics().retired == {"user": 2}


async def test_retire_hook_that_raises_fails_that_call(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type, retire=workerfns.retire_raises) as ctx:
        with pytest.raises(tpf.WorkerHookError, match="retire hook raised KeyError") as info:
            await ctx.run_sync(workerfns.add, 1, 2)
        assert info.value.hook == "retire"
        assert ctx.statistics().idle_workers == 0


async def test_idle_workers_leave_after_idle_timeout(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type, idle_timeout=0.2) as ctx:
        worker = await ctx.run_sync(workerfns.pid)
        await trio.sleep(0.5)
        stats = ctx.statistics()  # notices the exit (and reaps a spawned worker)
        assert (stats.idle_workers, stats.retired) == (0, {"idle": 1})
        assert not wait_until_gone({worker}, 5)
        assert await ctx.run_sync(workerfns.pid) != worker


async def test_idle_exit_racing_a_new_job_is_not_a_crash(worker_type):
    """idle_timeout=0: the worker leaves as soon as it is idle, so every job
    after the first races its exit; none may fail."""
    async with tpf.open_worker_context(worker_type=worker_type, idle_timeout=0) as ctx:
        for i in range(5):
            assert await ctx.run_sync(workerfns.add, i, 1) == i + 1
        assert "died" not in ctx.statistics().retired


async def test_infinite_idle_timeout_keeps_workers(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type, idle_timeout=math.inf) as ctx:
        assert await ctx.run_sync(workerfns.pid) == await ctx.run_sync(workerfns.pid)


async def test_grace_period_kills_a_worker_stuck_at_exit(worker_type):
    expected = r"did not exit within grace_period=0.3s after their context closed, and were killed"
    with pytest.raises(tpf.BrokenWorkerError, match=expected):
        async with tpf.open_worker_context(worker_type=worker_type, grace_period=0.3) as ctx:
            pid = await ctx.run_sync(workerfns.pid)
            # A stopped worker cannot act on its channel closing.
            os.kill(pid, signal.SIGSTOP)
