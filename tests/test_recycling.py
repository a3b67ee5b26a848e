"""Recycling: by job count (with jitter), by memory after a job, at a ceiling
during a job; USS versus RSS; the statistics that tell the story."""

from __future__ import annotations

import sys

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("needs Linux: memory figures from /proc/<pid>/smaps_rollup", allow_module_level=True)

import itertools
import os

import psutil
import recyclefns
import trio
import trio.testing
import workerfns
from conftest import wait_until_gone

import trio_parallel_fs as tpf
from _trio_parallel_fs_worker._memory import memory_usage

MiB = 2**20


async def test_worker_retires_after_exactly_max_jobs(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type, max_jobs=3) as ctx:
        pids = [await ctx.run_sync(workerfns.pid) for _ in range(7)]
        assert pids[0] == pids[1] == pids[2] != pids[3]
        assert pids[3] == pids[4] == pids[5] != pids[6]
        assert ctx.statistics().retired == {"jobs": 2}
        assert not wait_until_gone(set(pids[:6]), 5)


async def test_jitter_spreads_retirements():
    async with tpf.open_worker_context(max_jobs=1, max_jobs_jitter=4) as ctx:
        pids = [await ctx.run_sync(workerfns.pid) for _ in range(60)]
    # Lengths of the runs of jobs each worker served, but the last (cut short).
    runs = [len(list(group)) for _, group in itertools.groupby(pids)][:-1]
    assert all(1 <= run <= 5 for run in runs), runs
    assert len(set(runs)) > 1, f"every worker served the same number of jobs: {runs}"


async def test_leaking_job_is_recycled_by_max_memory_and_memory_stays_bounded():
    limit = 120 * MiB
    async with tpf.open_worker_context(max_memory=limit) as ctx:
        template = ctx.statistics().template_pid
        for _ in range(10):
            await ctx.run_sync(recyclefns.leak, 50)
            tree = [template] + [child.pid for child in psutil.Process(template).children()]
            total = sum(memory_usage("uss", pid) for pid in tree if psutil.pid_exists(pid))
            # A worker leaves once above the limit, so at most limit + one leak
            # per worker, plus the template.
            assert total < limit + 50 * MiB + memory_usage("uss", template) + 60 * MiB
        retired = ctx.statistics().retired
        assert retired.get("memory", 0) >= 3, retired


async def test_memory_ceiling_kills_a_runaway_job_and_spares_the_others(worker_type):
    ceiling = 150 * MiB
    async with tpf.open_worker_context(memory_ceiling=ceiling, worker_type=worker_type) as ctx:
        results = []

        async def well_behaved():
            results.append(await ctx.run_sync(workerfns.sleep_and_return, 1.0, "fine"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(well_behaved)
            with trio.fail_after(30):
                with pytest.raises(tpf.MemoryCeilingError) as info:
                    await ctx.run_sync(recyclefns.hog, 1000, 30)
        error = info.value
        assert isinstance(error, tpf.BrokenWorkerError)
        assert error.used > ceiling and error.ceiling == ceiling
        assert error.signal_name == "SIGKILL"
        assert "killed at the memory ceiling" in str(error) and "USS" in str(error)
        assert results == ["fine"]
        assert ctx.statistics().retired == {"ceiling": 1}
        assert await ctx.run_sync(workerfns.add, 1, 2) == 3


async def test_uss_does_not_count_the_templates_shared_pages():
    pytest.importorskip("scipy")
    async with tpf.open_worker_context(preload=["numpy", "scipy.linalg", "recyclefns"]) as ctx:
        worker = await ctx.run_sync(recyclefns.numpy_scipy_job)
        uss, rss = memory_usage("uss", worker), memory_usage("rss", worker)
        # gc.freeze keeps the template's objects shared after a numpy job.
        assert uss < 10 * MiB, f"USS {uss / MiB:.1f} MiB"
        assert rss > 3 * uss


async def test_rss_limit_would_retire_every_worker_uss_limit_does_not():
    pytest.importorskip("scipy")
    preload = ["numpy", "scipy.linalg", "recyclefns"]
    async with tpf.open_worker_context(preload=preload, max_memory=25 * MiB, memory_metric="uss") as ctx:
        first = await ctx.run_sync(recyclefns.numpy_scipy_job)
        second = await ctx.run_sync(recyclefns.numpy_scipy_job)
        assert first == second
    # RSS counts the template's shared pages: a fresh worker is already above
    # the limit, so it retires after every job, and the context says so once.
    async with tpf.open_worker_context(preload=preload, max_memory=25 * MiB, memory_metric="rss") as ctx:
        with pytest.warns(RuntimeWarning) as warned:
            first = await ctx.run_sync(recyclefns.numpy_scipy_job)
            second = await ctx.run_sync(recyclefns.numpy_scipy_job)
        assert first != second
    assert len(warned) == 1
    message = str(warned[0].message)
    assert message.startswith("max_memory=25.0 MiB is below what a fresh worker of this context uses before any job")
    assert "MiB (RSS), so every worker retires after every job" in message


async def test_statistics_count_every_way_out():
    async with tpf.open_worker_context(max_jobs=2) as ctx:
        for _ in range(4):
            await ctx.run_sync(workerfns.add, 1, 2)
        with pytest.raises(tpf.BrokenWorkerError):
            await ctx.run_sync(workerfns.exit_with, 3)
        with trio.move_on_after(0.3):
            await ctx.run_sync(workerfns.sleep_and_return, 30, kill_on_cancel=True)
        stats = ctx.statistics()
        assert stats.retired == {"jobs": 2, "died": 1, "killed": 1}
        assert stats.started_workers == 4
        assert stats.idle_workers == 0 and stats.running_workers == 0


def test_memory_usage_metrics_agree_with_psutil():
    info = psutil.Process().memory_full_info()
    me = os.getpid()
    for metric in ("uss", "pss", "rss"):
        ours = memory_usage(metric, me)
        theirs = getattr(info, metric)
        assert abs(ours - theirs) < 0.2 * theirs + 4 * MiB, (metric, ours, theirs)
    with pytest.raises(ValueError, match="memory metric must be one of"):
        memory_usage("vms")


def test_exceeds_screens_with_rss_and_reports_the_metric():
    from _trio_parallel_fs_worker import _memory

    try:
        rss = memory_usage("rss")
        uss = memory_usage("uss")
        assert _memory.exceeds(rss * 2, "uss") is None  # below RSS: USS is never computed
        above = _memory.exceeds(uss // 2, "uss")
        assert above is not None and uss // 2 < above <= rss * 1.1
        assert _memory.exceeds(1, "rss") is not None
    finally:
        # exceeds() keeps this process's statm open for next time: close it.
        if _memory._own_statm is not None:
            os.close(_memory._own_statm[1])
            _memory._own_statm = None


def test_memory_watch_measures_uss_again_only_when_it_could_have_crossed(monkeypatch):
    from _trio_parallel_fs_worker import _memory

    rss = [100 * MiB]
    measured = []
    monkeypatch.setattr(_memory, "_rss_from_statm", lambda pid: rss[0])
    monkeypatch.setattr(_memory, "memory_usage", lambda metric, pid=None: measured.append(metric) or 30 * MiB)
    clock = [0.0]
    monkeypatch.setattr(_memory.time, "monotonic", lambda: clock[0])
    watch = _memory.MemoryWatch(limit=50 * MiB, metric="uss", recheck_after=1.0)

    assert watch.exceeded() is False and measured == ["uss"]  # RSS above: measure once
    rss[0] += 10 * MiB
    assert watch.exceeded() is False and len(measured) == 1  # 30 + 10 <= 50: skip
    rss[0] += 15 * MiB
    assert watch.exceeded() is False and len(measured) == 2  # 30 + 25 > 50: measure
    clock[0] += 1.5
    assert watch.exceeded() is False and len(measured) == 3  # a second passed: measure
    rss[0] = 40 * MiB
    assert watch.exceeded() is False and len(measured) == 3  # RSS below the limit
    assert _memory.MemoryWatch(limit=50 * MiB, metric="rss").exceeded() is False
    rss[0] = 60 * MiB
    assert _memory.MemoryWatch(limit=50 * MiB, metric="rss").exceeded() is True


async def test_a_retiring_worker_gets_a_successor_prepared_for_the_next_call():
    """max_jobs=1: each call's worker retires with its result, and its successor
    is forked and handed its channel at once, so the next call finds it ready."""
    async with tpf.open_worker_context(max_jobs=1) as ctx:
        first = await ctx.run_sync(workerfns.pid)
        await trio.testing.wait_all_tasks_blocked()  # it is asked for once the caller lets Trio run
        stats = ctx.statistics()
        assert (stats.prepared_workers, stats.idle_workers, stats.started_workers) == (1, 0, 1)
        template = psutil.Process(stats.template_pid)

        def ready() -> set[int]:  # forked (or the spare, handed its channel), not the one that left
            workers = set()
            for child in template.children():
                try:
                    if child.name() == "tpf-worker":
                        workers.add(child.pid)
                except psutil.NoSuchProcess:  # the one that left, exiting as we look
                    pass
            return workers - {first}

        with trio.fail_after(5):
            while not (waiting := ready()):  # noqa: ASYNC110 - polling other processes
                await trio.sleep(0.01)
        second = await ctx.run_sync(workerfns.pid)
        assert second != first and second in waiting  # the prepared one, already a worker
        stats = ctx.statistics()
        assert (stats.started_workers, stats.retired) == (2, {"jobs": 2})


async def test_spawned_workers_are_not_prepared_ahead():
    async with tpf.open_worker_context(max_jobs=1, worker_type="spawn") as ctx:
        await ctx.run_sync(workerfns.pid)
        assert ctx.statistics().prepared_workers == 0
