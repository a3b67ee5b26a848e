"""The template: preload, single-threadedness, forking, reaping and killing."""

from __future__ import annotations

import sys

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("needs Linux: the template's forks, prctl and /proc", allow_module_level=True)

import functools
import os
import signal
import time

import psutil
import trio
import workerfns
from conftest import wait_until_gone

import trio_parallel_fs as tpf
from _trio_parallel_fs_worker import _template


async def test_preload_happens_once_in_the_template():
    async with tpf.open_worker_context(preload=["preload_marker"]) as ctx:
        template_pid = ctx.statistics().template_pid
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(ctx.run_sync, workerfns.sleep_and_return, 0.2)
        assert ctx.statistics().started_workers == 2
        # Imported in the template, inherited by the worker: no import in the worker.
        assert await ctx.run_sync(workerfns.preload_marker_pid) == template_pid
        assert ctx.statistics().preload == ("preload_marker",)


async def test_workers_are_forked_by_the_template_not_by_us():
    async with tpf.open_worker_context() as ctx:
        template_pid = ctx.statistics().template_pid
        assert await ctx.run_sync(workerfns.parent_pid) == template_pid
        assert psutil.Process(template_pid).ppid() == os.getpid()


async def test_template_freezes_the_gc_after_preload():
    async with tpf.open_worker_context(preload=["preload_marker"]) as ctx:
        assert await ctx.run_sync(workerfns.gc_freeze_count) > 0


async def test_failing_preload_raises_at_context_start_with_the_import_error():
    with pytest.raises(tpf.TemplateStartError, match="could not preload") as info:
        async with tpf.open_worker_context(preload=["preload_broken"]):
            pass  # pragma: no cover
    assert isinstance(info.value.__cause__, ImportError)
    assert "fails to import on purpose" in str(info.value)


async def test_missing_preload_module_is_named():
    with pytest.raises(tpf.TemplateStartError, match="No module named 'no_such_module_xyz'"):
        async with tpf.open_worker_context(preload=["no_such_module_xyz"]):
            pass  # pragma: no cover


async def test_preload_that_starts_threads_is_refused():
    with pytest.raises(tpf.TemplateStartError, match="left 2 threads running") as info:
        async with tpf.open_worker_context(preload=["preload_threads"]):
            pass  # pragma: no cover
    assert "starts-at-import" in str(info.value)


async def test_failing_preload_in_the_default_context_fails_the_call():
    tpf.configure_default_context(preload=["preload_broken"])
    for _ in range(2):  # each call tries again, and says why it failed
        with pytest.raises(tpf.TemplateStartError, match="fails to import on purpose"):
            await tpf.run_sync(workerfns.add, 1, 2)


async def test_blas_threads_are_capped_in_workers():
    async with tpf.open_worker_context() as ctx:
        assert await ctx.run_sync(workerfns.environment, "OPENBLAS_NUM_THREADS") == "1"
        assert await ctx.run_sync(workerfns.environment, "OMP_NUM_THREADS") == "1"
    async with tpf.open_worker_context(blas_threads=None) as ctx:
        assert await ctx.run_sync(workerfns.environment, "OPENBLAS_NUM_THREADS") == os.environ.get(
            "OPENBLAS_NUM_THREADS"
        )


async def test_numpy_and_scipy_preload_keeps_the_template_single_threaded():
    pytest.importorskip("scipy")
    async with tpf.open_worker_context(preload=["numpy", "scipy.linalg"]) as ctx:
        template = psutil.Process(ctx.statistics().template_pid)
        assert template.num_threads() == 1
        loaded = await ctx.run_sync(workerfns.modules_loaded, "numpy", "scipy.linalg")
        assert loaded == {"numpy": True, "scipy.linalg": True}


async def test_control_channel_is_an_unnamed_socketpair():
    async with tpf.open_worker_context() as ctx:
        template = psutil.Process(ctx.statistics().template_pid)
        sockets = template.net_connections(kind="unix")
        assert sockets, "the template should hold its control channel"
        assert all(not conn.laddr and not conn.raddr for conn in sockets)


async def test_job_traffic_bypasses_the_template():
    async with tpf.open_worker_context() as ctx:
        await ctx.run_sync(workerfns.add, 1, 2)  # an idle worker exists now
        template_pid = ctx.statistics().template_pid
        os.kill(template_pid, signal.SIGSTOP)
        try:
            with trio.fail_after(10):
                assert await ctx.run_sync(workerfns.add, 2, 2) == 4
        finally:
            os.kill(template_pid, signal.SIGCONT)


async def test_template_killed_mid_job_fails_the_call_and_a_new_template_follows():
    async with tpf.open_worker_context() as ctx:
        template_pid = ctx.statistics().template_pid
        async with trio.open_nursery() as nursery:

            async def call():
                with pytest.raises(tpf.BrokenWorkerError, match="the template process died") as info:
                    await ctx.run_sync(workerfns.sleep_and_return, 30)
                assert info.value.template_died is True

            nursery.start_soon(call)
            while ctx.statistics().running_workers == 0:  # noqa: ASYNC110 - polling another process
                await trio.sleep(0.01)
            await trio.sleep(0.1)
            os.kill(template_pid, signal.SIGKILL)
        assert await ctx.run_sync(workerfns.add, 1, 2) == 3
        new_template = ctx.statistics().template_pid
        assert new_template != template_pid
        assert await ctx.run_sync(workerfns.parent_pid) == new_template


async def test_template_killed_while_idle_is_replaced():
    async with tpf.open_worker_context() as ctx:
        await ctx.run_sync(workerfns.add, 1, 2)
        template_pid = ctx.statistics().template_pid
        os.kill(template_pid, signal.SIGKILL)
        template = psutil.Process(template_pid)
        with trio.fail_after(5):
            while template.status() != psutil.STATUS_ZOMBIE:  # noqa: ASYNC110 - another process
                await trio.sleep(0.01)
        # The cached worker died with it (PR_SET_PDEATHSIG); the call notices
        # before sending the job, and a new template serves it.
        assert await ctx.run_sync(workerfns.add, 1, 2) == 3
        assert ctx.statistics().template_pid != template_pid
        assert ctx.statistics().retired == {"died": 1}


def test_template_kills_only_workers_it_has_not_reaped(monkeypatch):
    """A KILL for a reaped worker must not signal its (possibly reused) pid."""
    killed = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append((pid, sig)))
    template = _template.Template.__new__(_template.Template)
    template.workers = {0: (4242, -1)}
    template.kill(0)
    template.kill(1)  # never forked, or reaped already
    assert killed == [(4242, signal.SIGKILL)]


async def test_worker_exit_code_is_reported(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        with pytest.raises(tpf.BrokenWorkerError, match="died with exit code 7") as info:
            await ctx.run_sync(workerfns.exit_with, 7)
        assert info.value.exitcode == 7 and info.value.signal_name is None


async def test_segfault_is_reported_with_its_signal(worker_type):
    import ctypes

    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        with pytest.raises(tpf.BrokenWorkerError, match="SIGSEGV.*native code"):
            await ctx.run_sync(ctypes.string_at, 0)
        assert await ctx.run_sync(workerfns.add, 1, 1) == 2


async def test_sigterm_from_outside_is_named(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        async with trio.open_nursery() as nursery:

            async def call():
                with pytest.raises(tpf.BrokenWorkerError, match="SIGTERM.*KillMode=control-group"):
                    await ctx.run_sync(workerfns.sleep_and_return, 30)

            nursery.start_soon(call)
            while not worker_pids(ctx):  # noqa: ASYNC110 - polling another process
                await trio.sleep(0.02)
            await trio.sleep(0.1)
            (worker_pid,) = worker_pids(ctx)
            os.kill(worker_pid, signal.SIGTERM)


async def test_workers_exit_when_their_context_closes():
    async with tpf.open_worker_context() as ctx:
        worker = await ctx.run_sync(workerfns.pid)
        template = ctx.statistics().template_pid
    for pid in (worker, template):
        with pytest.raises(psutil.NoSuchProcess):
            psutil.Process(pid).status()


async def test_output_printed_in_a_worker_is_not_lost(capfd):
    def shout():
        print("hello from the worker")

    async with tpf.open_worker_context(max_jobs=1) as ctx:
        await ctx.run_sync(shout)
    assert "hello from the worker" in capfd.readouterr().out


def test_template_counts_native_threads_too():
    assert _template.count_threads() == len(os.listdir("/proc/self/task"))


def children_named(process: psutil.Process, name: str) -> list[psutil.Process]:
    """The children of ``process`` of that name now (one that exits as we look
    is not one of them)."""
    found = []
    for child in process.children():
        try:
            if child.name() == name:
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def worker_pids(ctx):
    """Pids of the context's live workers, seen from outside."""
    template_pid = ctx.statistics().template_pid
    if template_pid is not None:  # the template's children, but its spare
        return [child.pid for child in children_named(psutil.Process(template_pid), "tpf-worker")]
    return [p.pid for p in psutil.Process().children() if "worker" in p.cmdline()]


def warm_up_numpy():
    import numpy

    numpy.linalg.det(numpy.eye(3))


async def test_template_init_runs_once_in_the_template_before_the_freeze(worker_type):
    pytest.importorskip("numpy")

    def mark():
        os.environ["TPF_TEMPLATE_INIT_RAN_IN"] = str(os.getpid())

    async with tpf.open_worker_context(worker_type=worker_type, preload=["numpy"], template_init=mark) as ctx:
        ran_in = await ctx.run_sync(workerfns.environment, "TPF_TEMPLATE_INIT_RAN_IN")
        expected = ctx.statistics().template_pid if worker_type == "forkserver" else await ctx.run_sync(workerfns.pid)
        assert ran_in == str(expected)


async def test_template_init_that_raises_fails_the_start():
    def broken():
        raise ValueError("warm-up failed")

    with pytest.raises(tpf.TemplateStartError, match="ValueError: warm-up failed"):
        async with tpf.open_worker_context(template_init=broken):
            pass  # pragma: no cover


async def test_template_init_that_starts_threads_is_refused():
    import threading

    def start_thread():
        threading.Thread(target=time.sleep, args=(30,), daemon=True, name="from-template-init").start()

    with pytest.raises(tpf.TemplateStartError, match="running template_init in the template left 2 threads"):
        async with tpf.open_worker_context(template_init=start_thread):
            pass  # pragma: no cover


async def test_a_spare_worker_is_forked_ahead_and_handed_the_next_channel():
    def hold_then_pid():
        time.sleep(0.3)
        return os.getpid()

    async with tpf.open_worker_context() as ctx:
        template = psutil.Process(ctx.statistics().template_pid)
        assert template.name() == "tpf-template"
        assert template.children() == []  # no spare before anyone asked for a worker
        first = await ctx.run_sync(workerfns.pid)
        with trio.fail_after(5):
            while not (spares := children_named(template, "tpf-spare")):  # noqa: ASYNC110
                await trio.sleep(0.01)
        (spare,) = spares
        # Two calls at once: one runs on the idle worker, the other needs a new
        # worker, and the template hands it the spare instead of forking.
        pids = []
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(lambda: _append(pids, ctx.run_sync(hold_then_pid)))
        assert sorted(pids) == sorted([first, spare.pid])
        assert await ctx.run_sync(workerfns.parent_pid) == template.pid


async def _append(results: list, call) -> None:
    results.append(await call)


async def test_a_dead_spare_is_replaced_not_used():
    async with tpf.open_worker_context(max_jobs=1) as ctx:
        template = psutil.Process(ctx.statistics().template_pid)
        first = await ctx.run_sync(workerfns.pid)
        # The successor prepared for the next call is a worker already (forked,
        # or handed the spare), and a new spare waits beside it.
        with trio.fail_after(5):
            while True:
                children = {c.pid: c.name() for c in template.children() if c.pid != first}
                spares = [pid for pid, name in children.items() if name == "tpf-spare"]
                if spares and "tpf-worker" in children.values():
                    break
                await trio.sleep(0.01)
        spares = [psutil.Process(pid) for pid in spares]
        spares[0].kill()
        # Once the template has reaped it (a kill racing a hand-off is a worker
        # killed from outside, and fails that call), it is never handed a job.
        assert not wait_until_gone({spares[0].pid}, 5)
        for i in range(3):
            assert await ctx.run_sync(workerfns.add, i, 1) == i + 1
        assert "died" not in ctx.statistics().retired


@pytest.mark.parametrize("worker_type", ["forkserver", "spawn"])
async def test_ps_ef_says_what_each_process_is(worker_type):
    """The command line names the child package and the role, not ``python -c
    import sys; sys.path.insert(...)``."""
    from trio_parallel_fs._backends.launch import CHILD_PACKAGE

    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        worker = psutil.Process(await ctx.run_sync(workerfns.pid))
        template_pid = ctx.statistics().template_pid
        if worker_type == "forkserver":
            # Forked workers show the template's command line, and their own name.
            assert psutil.Process(template_pid).cmdline()[1:3] == [CHILD_PACKAGE, "template"]
            assert worker.name() == "tpf-worker"
        else:
            assert worker.cmdline()[1:3] == [CHILD_PACKAGE, "worker"]
        assert CHILD_PACKAGE.endswith("_trio_parallel_fs_worker")


@pytest.mark.parametrize(
    ("kept", "ahead", "wanted"),
    [(0, False, 1), (3, False, 3), (0, True, 1), (1, True, 2), (_template._MAX_SPARES, True, _template._MAX_SPARES)],
)
def test_each_successor_forked_for_want_of_a_spare_makes_the_template_keep_one_more(kept, ahead, wanted):
    """A request that found no spare: the first makes one spare wanted; a
    successor prepared ahead (a retiring worker's, as with max_jobs=1) one
    more, up to the cap; a plain request (a pool filling up) never more."""
    assert _template.spares_wanted(kept, ahead) == wanted


async def test_a_burst_of_single_use_workers_leaves_spares_for_the_next_one():
    def hold_then_pid():
        time.sleep(0.2)
        return os.getpid()

    async with tpf.open_worker_context(max_jobs=1) as ctx:
        template = psutil.Process(ctx.statistics().template_pid)
        limiter = trio.CapacityLimiter(4)

        async def burst() -> list[int]:
            pids: list[int] = []
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(lambda: _append(pids, ctx.run_sync(hold_then_pid, limiter=limiter)))
            return pids

        def spares() -> set[int]:
            return {child.pid for child in children_named(template, "tpf-spare")}

        # Four successors asked for at once: those that find no spare make the
        # template keep more (how many found one depends on how quickly the
        # refills came), forked once the CPUs are idle, up to its cap.
        seen: set[int] = set()
        for _ in range(6):
            await burst()
            with trio.move_on_after(2):
                while len(seen := spares()) < 2:  # noqa: ASYNC110 - polling another process's children
                    await trio.sleep(0.01)
            if len(seen) >= 2:
                break
        assert 2 <= len(seen) <= _template._MAX_SPARES, seen
        # The next bursts' workers are those spares, handed a channel (no fork).
        second = await burst()
        third = await burst()
        assert seen & {*second, *third}, (seen, second, third)
        assert await ctx.run_sync(workerfns.parent_pid) == template.pid


async def test_spares_kept_after_a_burst_leave_once_bursts_stop():
    """The spares beyond the first leave min(idle_timeout, 10 s) after the
    last successor was asked for: a burst's workers are not kept for ever."""

    def hold_then_pid():
        time.sleep(0.2)
        return os.getpid()

    async with tpf.open_worker_context(max_jobs=1, idle_timeout=1.0) as ctx:
        template = psutil.Process(ctx.statistics().template_pid)
        limiter = trio.CapacityLimiter(4)

        def spares() -> set[int]:
            return {child.pid for child in children_named(template, "tpf-spare")}

        seen: set[int] = set()
        with trio.fail_after(60):
            while len(seen) < 2:
                async with trio.open_nursery() as nursery:
                    for _ in range(4):
                        nursery.start_soon(functools.partial(ctx.run_sync, hold_then_pid, limiter=limiter))
                with trio.move_on_after(0.5):
                    while len(seen := spares()) < 2:  # noqa: ASYNC110 - polling another process's children
                        await trio.sleep(0.01)
            while len(left := spares()) > 1:  # noqa: ASYNC110 - polling another process's children
                await trio.sleep(0.05)
        assert len(left) == 1
        assert not wait_until_gone(seen - left, 5)  # exited and reaped, not zombies
        assert await ctx.run_sync(workerfns.add, 1, 2) == 3
