"""The bounded busy-wait of both ends: when it happens, that it yields, that it ends."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading

import pytest
import trio
import workerfns

import trio_parallel_fs as tpf
from _trio_parallel_fs_worker import protocol as p
from _trio_parallel_fs_worker._spin import (
    CallerSpin,
    WorkerSpin,
    busy_waits_pay,
    cgroup_cpu_quota,
    sleep_for_input,
    usable_cpus,
)
from trio_parallel_fs._config import WorkerConfig
from trio_parallel_fs._loops import trio_loop
from trio_parallel_fs._pool.channel import PooledWorker

needs_two_cpus = pytest.mark.skipif(not busy_waits_pay(), reason="busy-waits are off where only one CPU is usable")

MS = 1_000_000  # nanoseconds
SETTINGS = WorkerConfig().worker_settings()


@needs_two_cpus
def test_the_window_closes_after_a_slow_wait_and_opens_after_quick_ones():
    spin = CallerSpin(0.001)  # a 1 ms limit
    assert spin.window_ns() == 1 * MS  # nothing seen yet: try
    spin.waited(MS // 10)
    assert spin.window_ns() == 1 * MS
    spin.waited(50 * MS)  # one slow job
    assert spin.window_ns() == 0
    quick = 0
    while spin.window_ns() == 0:
        spin.waited(MS // 10)
        quick += 1
    assert 1 <= quick <= 3  # a pause does not stop busy waits for long


def _blocked_before_a_window(spin: CallerSpin) -> int:
    """How many (quick) waits block at once before the spin gives a window again."""
    blocked = 0
    while spin.window_ns() == 0:
        spin.waited(MS // 10)
        blocked += 1
    return blocked


@needs_two_cpus
def test_after_busy_waits_that_ran_out_waits_block_at_once_one_then_twice_as_many_each_time():
    """A busy-wait that runs out (the worker waits for a CPU another process
    holds, say) is followed by waits that block at once, more after each
    further one in a row; one that sees its message in time ends that."""
    spin = CallerSpin(0.001)
    assert spin.window_ns() == MS
    spin.waited(MS + MS // 10)  # ran out: the reply came a tenth of a limit later
    assert _blocked_before_a_window(spin) == 1
    spin.waited(MS + MS // 10)
    assert _blocked_before_a_window(spin) == 2
    spin.waited(MS + MS // 10)
    assert _blocked_before_a_window(spin) == 4
    spin.waited(MS // 10)  # in time
    assert spin.window_ns() == MS
    spin.waited(MS + MS // 10)
    assert _blocked_before_a_window(spin) == 1


@needs_two_cpus
def test_regular_waits_longer_than_the_limit_sleep_first_then_busy_wait_around_the_message():
    spin = WorkerSpin(0.001)
    assert spin.plan() == (0, 1 * MS)  # nothing seen yet: quick waits assumed
    for _ in range(40):  # a loop that calls every 5 ms
        spin.waited(5 * MS)
    sleep, busy = spin.plan()
    assert busy == 1 * MS
    assert 4 * MS <= sleep <= int(4.5 * MS)  # wakes half a limit (and the spread) early


@needs_two_cpus
def test_irregular_or_very_long_waits_never_busy_wait():
    irregular = WorkerSpin(0.001)
    for _ in range(20):
        irregular.waited(2 * MS)
        irregular.waited(8 * MS)
    assert irregular.plan() == (0, 0)
    long = WorkerSpin(0.001)
    for _ in range(40):
        long.waited(100 * MS)  # beyond _REGULAR_MAX limits: sleep it all
    assert long.plan() == (0, 0)


def test_sleeping_for_input_to_the_microsecond_sees_input_and_times_out():
    ours, theirs = socket.socketpair()
    try:
        assert not sleep_for_input(ours, 200_000)  # 200 µs, nothing sent
        theirs.send(b"x")
        assert sleep_for_input(ours, 10 * MS)
    finally:
        ours.close()
        theirs.close()


@pytest.mark.skipif(sys.platform == "win32", reason="fd numbers and RLIMIT_NOFILE are POSIX's; Windows has handles")
def test_sleeping_for_input_on_an_fd_beyond_selects_range_counts_whole_milliseconds():
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"this process may not open fd 2000 (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    ours, theirs = socket.socketpair()
    high = socket.socket(fileno=os.dup2(ours.fileno(), 2000))
    try:
        assert not sleep_for_input(high, 200_000)  # below a millisecond: no wait at all
        assert not sleep_for_input(high, 2 * MS)
        theirs.send(b"x")
        assert sleep_for_input(high, 2 * MS)
    finally:
        high.close()
        ours.close()
        theirs.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@needs_two_cpus
def test_the_worker_sleeps_through_a_regular_wait_then_busy_waits(monkeypatch):
    """A worker whose jobs come every 5 ms sleeps ~4.5 ms (to the microsecond)
    and then looks busily; the job, sent 5 ms after it began waiting, is read."""
    from _trio_parallel_fs_worker import _worker

    ours, theirs = socket.socketpair()
    inbox = _worker.Inbox(ours, p.Connection(p.WORKER))
    inbox.spin = WorkerSpin(0.001)
    for _ in range(40):
        inbox.spin.waited(5 * MS)
    planned_sleep = inbox.spin.plan()[0]
    sleeps = []
    real_sleep = _worker.sleep_for_input

    def recording_sleep(sock, ns):
        sleeps.append(ns)
        return real_sleep(sock, ns)

    monkeypatch.setattr(_worker, "sleep_for_input", recording_sleep)
    sender = threading.Timer(0.005, theirs.send, [b"job"])
    sender.start()
    try:
        assert inbox._wait_for_input()
        assert sleeps == [planned_sleep]
        assert ours.recv(16) == b"job"
    finally:
        sender.join()
        ours.close()
        theirs.close()


def test_a_limit_of_zero_never_busy_waits():
    spin = CallerSpin(0)
    assert spin.limit_ns == 0 and spin.window_ns() == 0


def test_one_usable_cpu_turns_busy_waits_off():
    """Pinned to one CPU, the two ends take turns on it: busy-waiting would only
    delay the other end (measured 1.4x slower), so the limit becomes 0."""
    script = textwrap.dedent(
        """
        import os
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        from _trio_parallel_fs_worker._spin import CallerSpin, usable_cpus
        print(usable_cpus(), CallerSpin(0.001).limit_ns)
        """
    )
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("this OS has no CPU affinity call")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "0"]


def test_usable_cpus_is_at_most_the_affinity_mask():
    cpus = usable_cpus()
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 0 < cpus <= allowed


def write_file(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_cgroup_cpu_quota_is_the_smallest_along_the_groups_path(tmp_path):
    membership = tmp_path / "cgroup"
    root = tmp_path / "fs"
    write_file(membership, "0::/box/app\n")
    write_file(root / "box" / "app" / "cpu.max", "max 100000\n")  # the group itself: no quota
    assert cgroup_cpu_quota(str(membership), str(root)) is None
    write_file(root / "box" / "cpu.max", "150000 100000\n")  # the container above it: 1.5 CPUs
    assert cgroup_cpu_quota(str(membership), str(root)) == 1.5
    write_file(root / "box" / "app" / "cpu.max", "300000 100000\n")
    assert cgroup_cpu_quota(str(membership), str(root)) == 1.5
    write_file(root / "box" / "app" / "cpu.max", "50000 100000\n")
    assert cgroup_cpu_quota(str(membership), str(root)) == 0.5
    # cgroup v1 only (no "0::" line), or no membership file: no quota known.
    write_file(membership, "4:cpu,cpuacct:/box\n")
    assert cgroup_cpu_quota(str(membership), str(root)) is None
    assert cgroup_cpu_quota(str(tmp_path / "missing"), str(root)) is None


class ScriptedProcess:
    """Just enough of a WorkerProcess for PooledWorker.receive: started, alive."""

    pid = 12345

    def answered(self) -> bool:
        return True

    def has_exited(self) -> bool:
        return False


async def looks_for_a_reply(worker: PooledWorker, theirs: socket.socket, before_reply) -> int:
    """Receive on ``worker`` a reply that another task of this run sends on
    ``theirs`` after ``await before_reply()``; check it, and return how many
    times the caller looked for it."""
    looks = 0
    real_readable = worker._readable

    def counting_readable(timeout):
        nonlocal looks
        looks += 1
        return real_readable(timeout)

    worker._readable = counting_readable
    reply = b"".join(bytes(part) for part in p.Connection(p.WORKER).send(p.Value(pickle_of_three())))

    async def replier():
        await before_reply()
        theirs.sendall(reply)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(replier)
        with trio.fail_after(5):
            event = await worker.receive(answer_timeout=1)
    assert isinstance(event, p.Value) and bytes(event.pickled) == pickle_of_three()
    return looks


@needs_two_cpus
async def test_the_caller_busy_waits_for_a_quick_reply_letting_other_tasks_run(monkeypatch):
    """While it busy-waits, the caller checkpoints between two looks: here the
    reply is sent by another task of this run, which could not run otherwise,
    and it arrives before the spin's end (Trio's wait is never used)."""
    ours, theirs = socket.socketpair()
    worker = PooledWorker(ours, ScriptedProcess(), SETTINGS, busy_wait=0.01)  # type: ignore[arg-type]

    async def no_trio_wait(fd):
        raise AssertionError("the busy-wait gave up and blocked")

    monkeypatch.setattr(trio.lowlevel, "wait_readable", no_trio_wait)

    async def three_checkpoints():
        for _ in range(3):
            await trio.lowlevel.checkpoint()

    try:
        looks = await looks_for_a_reply(worker, theirs, three_checkpoints)
        assert looks >= 2  # it looked, yielded to the replier, and looked again
    finally:
        worker.close()
        theirs.close()


@needs_two_cpus
async def test_the_caller_blocks_at_once_while_replies_come_slowly(monkeypatch):
    """After replies slower than the limit the caller looks once and then
    waits through Trio; quick replies open the window again."""
    ours, theirs = socket.socketpair()
    worker = PooledWorker(ours, ScriptedProcess(), SETTINGS, busy_wait=0.001)  # type: ignore[arg-type]
    for _ in range(10):
        worker._spin.waited(50 * MS)
    real_wait = trio_loop.wait_readable_or_gone
    trio_waits = 0

    async def counting_wait(fd, gone):
        nonlocal trio_waits
        trio_waits += 1
        await real_wait(fd, gone)

    monkeypatch.setattr(trio_loop, "wait_readable_or_gone", counting_wait)

    async def five_ms():
        await trio.sleep(0.005)

    try:
        looks = await looks_for_a_reply(worker, theirs, five_ms)
        assert (looks, trio_waits) == (1, 1)
        for _ in range(6):  # each slow wait counted as at most 4 limits
            worker._spin.waited(MS // 10)
        assert worker._spin.window_ns() == 1 * MS
    finally:
        worker.close()
        theirs.close()


@needs_two_cpus
@pytest.mark.skipif(not os.path.exists("/proc/self/timerslack_ns"), reason="Linux 4.6+ shows the timer slack")
async def test_a_busy_waiting_worker_ends_its_sleeps_on_time_and_only_it(worker_type):
    for busy_wait, slack in ((0.0002, 1000), (0, 50_000)):
        async with tpf.open_worker_context(worker_type=worker_type, busy_wait=busy_wait) as ctx:
            assert await ctx.run_sync(workerfns.read_text, "/proc/self/timerslack_ns") == f"{slack}\n"


def pickle_of_three() -> bytes:
    import pickle

    return pickle.dumps(3, protocol=5)


async def test_a_busy_waiting_call_is_killed_on_cancel_and_the_context_goes_on(worker_type):
    """A job slower than the busy-wait limit, after quick ones: the caller may be
    spinning or blocked when the cancel comes; either way the worker dies and
    the next call gets a new one."""
    async with tpf.open_worker_context(worker_type=worker_type, busy_wait=0.01) as ctx:
        for _ in range(20):
            assert await ctx.run_sync(workerfns.add, 1, 2) == 3
        first = await ctx.run_sync(workerfns.pid)
        with trio.move_on_after(0.005) as scope:
            await ctx.run_sync(workerfns.busy_python, 30, kill_on_cancel=True)
        assert scope.cancelled_caught
        assert ctx.statistics().retired["killed"] == 1
        assert await ctx.run_sync(workerfns.pid) != first


async def test_results_are_right_with_and_without_busy_waits(worker_type):
    for busy_wait in (0, 0.0002, 0.01):
        async with tpf.open_worker_context(worker_type=worker_type, busy_wait=busy_wait) as ctx:
            results = [await ctx.run_sync(workerfns.add, i, i) for i in range(50)]
            assert results == [2 * i for i in range(50)]
            assert ctx.busy_wait == busy_wait
