"""Load: many jobs from many tasks while workers are killed at random.

The always-on size finishes in seconds; ``--soak`` (or ``TPF_SOAK=1``) scales
it up to the full soak (10,000 jobs per backend, more threads and jobs per thread).

Every job must either return *its own* result, once, or raise
BrokenWorkerError naming a worker that this test killed; nothing may hang;
child processes and open fds return to what they were; no zombies remain.
Workers are killed by pid, taken only from the children of the context's
template (forkserver) or from our own worker children (spawn).
"""

from __future__ import annotations

import sys

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("needs Linux: kills workers with POSIX signals and counts fds in /proc", allow_module_level=True)

import os
import random
import threading
import time

import psutil
import trio
import workerfns
from conftest import is_dead, open_fds, wait_dead, wait_until_gone

import trio_parallel_fs as tpf

SOAK = os.environ.get("TPF_SOAK", "") not in ("", "0")

JOBS = 10_000 if SOAK else 2_000
TASKS = 100
KILL_EVERY = 20  # one kill per 20 finished jobs: about 5%
THREADS = 6 if SOAK else 4
JOBS_PER_THREAD = 2_500 if SOAK else 250
TIMEOUT = 600 if SOAK else 120  # a bound for hangs, not a speed requirement


def job_seconds(i: int) -> float:
    # Mostly instant jobs, some that last long enough to be killed mid-job.
    return 0.002 if i % 4 == 0 else 0.0


def live_workers(template_pid: int | None, spawned_before: set[int]) -> list[psutil.Process]:
    """Worker processes that this test may kill."""
    try:
        if template_pid is not None:
            return psutil.Process(template_pid).children()
        return [
            p
            for p in psutil.Process().children()
            if p.pid not in spawned_before and "worker" in p.cmdline() and p.status() != psutil.STATUS_ZOMBIE
        ]
    except psutil.Error:
        return []  # the process list changed under us; try again later


def kill_one(candidates: list[psutil.Process], rng: random.Random) -> int | None:
    if not candidates:
        return None
    victim = rng.choice(candidates)
    try:
        victim.kill()  # psutil refuses if the pid was reused meanwhile
    except psutil.Error:
        return None
    return victim.pid


def check_outcomes(outcomes: dict[int, object], jobs: int, killed: set[int]) -> tuple[int, int]:
    """Every job has exactly one outcome: its own result, or an error naming a
    worker we killed. Returns (results, errors)."""
    assert sorted(outcomes) == list(range(jobs))
    errors = 0
    error_pids: list[int] = []
    for i, outcome in outcomes.items():
        if isinstance(outcome, tpf.BrokenWorkerError):
            errors += 1
            assert outcome.signal_name == "SIGKILL", outcome
            assert not outcome.template_died, outcome
            assert outcome.pid in killed, f"job {i}: {outcome} names a worker we did not kill"
            error_pids.append(outcome.pid)
        else:
            tag, j, value, _pid = outcome  # type: ignore[misc]
            assert (tag, j, value) == ("tagged", i, i * i + 7), f"job {i} got {outcome!r}"
    # One kill fails at most the one job its worker was running.
    assert len(error_pids) == len(set(error_pids))
    return jobs - errors, errors


def wait_dead_blocking(pid: int) -> None:
    deadline = time.monotonic() + 30
    while not is_dead(pid):
        assert time.monotonic() < deadline, f"killed worker {pid} does not die"
        time.sleep(0.005)


def no_zombie_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.status() == psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("worker_type", ["forkserver", "spawn"])
async def test_many_jobs_while_workers_are_killed_at_random(worker_type):
    rng = random.Random(1234)
    fds_before = open_fds()
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    spawned_before = {p.pid for p in psutil.Process().children()}
    outcomes: dict[int, object] = {}
    killed: set[int] = set()
    limiter = trio.CapacityLimiter(8)

    with trio.fail_after(TIMEOUT):
        async with tpf.open_worker_context(worker_type=worker_type) as ctx:
            template_pid = ctx.statistics().template_pid
            jobs = iter(range(JOBS))  # shared: each job is taken by exactly one task

            async def client():
                for i in jobs:
                    try:
                        outcome = await ctx.run_sync(workerfns.tagged, i, job_seconds(i), limiter=limiter)
                    except tpf.BrokenWorkerError as exc:
                        outcome = exc
                    assert i not in outcomes, f"job {i} finished twice"
                    outcomes[i] = outcome

            async def killer():
                while len(outcomes) < JOBS:
                    if len(outcomes) >= (len(killed) + 1) * KILL_EVERY:
                        pid = kill_one(live_workers(template_pid, spawned_before), rng)
                        if pid is not None:
                            killed.add(pid)
                    await trio.sleep(0.001)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(killer)
                async with trio.open_nursery() as clients:
                    for _ in range(TASKS):
                        clients.start_soon(client)

            # A worker killed just before the storm ended may still be dying:
            # a job sent to it now would fail (a race no pool can avoid).
            for pid in killed:
                await wait_dead(pid)
            results, errors = check_outcomes(outcomes, JOBS, killed)
            stats = ctx.statistics()
            assert stats.running_workers == 0
            assert stats.template_pid == template_pid, "the template should survive worker kills"
            assert len(killed) >= JOBS // KILL_EVERY // 4, "the killer hardly ran"
            assert errors <= len(killed)
            assert results + errors == JOBS
            print(f"{worker_type}: {JOBS} jobs, {len(killed)} workers killed, {errors} calls failed, {stats}")
            # The pool is healthy after the storm.
            assert await ctx.run_sync(workerfns.add, 1, 2) == 3

    # Everything started for this test is gone, nothing is a zombie, and the
    # fds are back (conftest checks this too; here it is the point of the test).
    new = {p.pid for p in psutil.Process().children(recursive=True)} - children_before
    assert not wait_until_gone(new, 5)
    assert not no_zombie_children()
    leaked = {
        fd: os.readlink(f"/proc/self/fd/{fd}")
        for fd in open_fds() - fds_before
        if os.path.exists(f"/proc/self/fd/{fd}")  # noqa: ASYNC240 - /proc, never blocks
    }
    assert not leaked


@pytest.mark.parametrize("worker_type", ["forkserver", "spawn"])
def test_concurrent_trio_runs_in_threads_share_the_default_context_under_load(worker_type):
    tpf.configure_default_context(worker_type=worker_type)
    fds_before = open_fds()
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    spawned_before = {p.pid for p in psutil.Process().children()}
    killed: set[int] = set()
    killed_lock = threading.Lock()
    outcomes: dict[int, object] = {}
    failures: list[BaseException] = []
    finished = threading.Event()

    done = [0]  # jobs finished in all threads (+= on an int is atomic enough: the killer only paces itself by it)

    def one_thread(index: int) -> None:
        first = index * JOBS_PER_THREAD
        mine: dict[int, object] = {}

        async def main():
            jobs = iter(range(first, first + JOBS_PER_THREAD))

            async def client():
                for i in jobs:
                    try:
                        outcome = await tpf.run_sync(workerfns.tagged, i, job_seconds(i))
                    except tpf.BrokenWorkerError as exc:
                        outcome = exc
                    assert i not in mine
                    mine[i] = outcome
                    done[0] += 1

            with trio.fail_after(TIMEOUT):
                async with trio.open_nursery() as nursery:
                    for _ in range(25):
                        nursery.start_soon(client)

        try:
            trio.run(main)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)
        with killed_lock:
            outcomes.update(mine)

    def killer() -> None:
        rng = random.Random(99)
        while not finished.wait(0.001):
            if done[0] >= (len(killed) + 1) * KILL_EVERY:
                template_pid = tpf.default_context_statistics().template_pid
                pid = kill_one(live_workers(template_pid, spawned_before), rng)
                if pid is not None:
                    with killed_lock:
                        killed.add(pid)

    threads = [threading.Thread(target=one_thread, args=(i,)) for i in range(THREADS)]
    kill_thread = threading.Thread(target=killer)
    kill_thread.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    finished.set()
    kill_thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads + [kill_thread]), "a thread hung"
    assert not failures, failures

    total = THREADS * JOBS_PER_THREAD
    results, errors = check_outcomes(outcomes, total, killed)
    assert results + errors == total
    assert errors <= len(killed)
    assert len(killed) >= 5, "the killer hardly ran"
    print(f"{worker_type}: {total} jobs in {THREADS} threads, {len(killed)} workers killed, {errors} calls failed")
    stats = tpf.default_context_statistics()
    assert stats.running_workers == 0
    for pid in killed:  # see test_many_jobs_while_workers_are_killed_at_random
        wait_dead_blocking(pid)
    # Still serving, from a new run in this thread.
    assert trio.run(tpf.run_sync, workerfns.add, 2, 3) == 5

    from trio_parallel_fs import _frontend

    _frontend._shut_down_default_context()
    new = {p.pid for p in psutil.Process().children(recursive=True)} - children_before
    assert not wait_until_gone(new, 5)
    assert not no_zombie_children()
    leaked = {
        fd: os.readlink(f"/proc/self/fd/{fd}")
        for fd in open_fds() - fds_before
        if os.path.exists(f"/proc/self/fd/{fd}")
    }
    assert not leaked
