"""The parent-side memory ceiling for spawned workers.

Real processes that grow past a ceiling, measured with psutil as on every
platform, plus the watcher thread's lifecycle: it runs only while something is
watched, stops on close, and forgets its parent's workers after a fork.
"""

from __future__ import annotations

import collections
import functools
import signal
import subprocess
import sys
import textwrap

import pytest
import trio

from trio_parallel_fs._backends.spawn.ceiling import CeilingWatcher, Watched

HANG = 30
MiB = 2**20

# Grows by touched 2 MiB blocks up to 400 MiB, then waits to be killed: a
# process the watcher missed would still be above the ceiling, not gone.
GROWER = textwrap.dedent(
    """
    import time
    blocks = []
    while len(blocks) < 200:
        block = bytearray(2 * 2**20)
        for offset in range(0, len(block), 4096):
            block[offset] = 1
        blocks.append(block)
        time.sleep(0.002)
    time.sleep(60)
    """
)

# Small, and alive until its stdin is closed.
SMALL = "import sys; sys.stdin.buffer.read()"


def start(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)


def end(popen: subprocess.Popen[bytes]) -> int:
    """Close its stdin and reap it (killing it if it is still running)."""
    assert popen.stdin is not None
    popen.stdin.close()
    try:
        return popen.wait(HANG)
    except subprocess.TimeoutExpired:
        popen.kill()
        return popen.wait()


async def wait_exit(popen: subprocess.Popen[bytes]) -> int:
    with trio.fail_after(HANG):
        return await trio.to_thread.run_sync(popen.wait)


async def wait_stopped(watcher: CeilingWatcher) -> None:
    with trio.fail_after(HANG):
        while watcher.running:  # noqa: ASYNC110 - a thread, not a Trio task
            await trio.sleep(0.005)


def metrics() -> list[str]:
    return ["uss", "rss", "pss"] if sys.platform.startswith("linux") else ["uss", "rss"]


@pytest.mark.parametrize("metric", metrics())
async def test_a_process_growing_past_the_ceiling_is_killed_with_its_figure(metric):
    ceiling = 100 * MiB
    watcher = CeilingWatcher(ceiling, metric)
    grower, small = start(GROWER), start(SMALL)
    try:
        watched_grower = watcher.watch(grower.pid, grower.kill)
        watched_small = watcher.watch(small.pid, small.kill)
        assert watcher.running
        code = await wait_exit(grower)
        assert watched_grower.used is not None, f"it exited with {code}, not at the ceiling"
        assert ceiling < watched_grower.used < 400 * MiB + ceiling
        if hasattr(signal, "SIGKILL"):
            assert code == -signal.SIGKILL
        # The small one, measured in the same rounds, was left alone.
        assert small.poll() is None
        assert watched_small.used is None
        watcher.unwatch(watched_grower)
        assert watcher.running  # still watching the small one
        watcher.unwatch(watched_small)
        await wait_stopped(watcher)
        assert watcher.count == 0
    finally:
        watcher.close()
        if grower.poll() is None:
            grower.kill()
        end(grower)
        assert end(small) == 0  # it exited on its own when its stdin closed


async def test_the_thread_runs_only_while_something_is_watched():
    watcher = CeilingWatcher(2**40)
    small = start(SMALL)
    try:
        assert not watcher.running
        first = watcher.watch(small.pid, small.kill)
        assert watcher.running
        watcher.unwatch(first)
        watcher.unwatch(first)  # twice is harmless
        await wait_stopped(watcher)
        second = watcher.watch(small.pid, small.kill)  # starts a new thread
        assert watcher.running
        watcher.close()
        assert not watcher.running  # close joins it
        assert second.used is None
        with pytest.raises(RuntimeError, match="watcher is closed"):
            watcher.watch(small.pid, small.kill)
    finally:
        watcher.close()
        assert end(small) == 0


async def test_kills_once_records_the_figure_and_never_after_unwatch(monkeypatch):
    # Measurements are faked, keyed by pid; the pids are only labels here.
    killed, unwatched, bystander = 4_000_001, 4_000_002, 4_000_003
    figures: dict[int, int | None] = {killed: None, unwatched: None, bystander: None}
    measured: collections.Counter[int] = collections.Counter()

    def measure(self: Watched, ceiling: int, metric: str) -> int | None:
        measured[self.pid] += 1
        return figures[self.pid]

    monkeypatch.setattr(Watched, "measure", measure)
    watcher = CeilingWatcher(10, interval=0.001)
    kills: list[int] = []
    try:
        watched = {pid: watcher.watch(pid, functools.partial(kills.append, pid)) for pid in figures}
        figures[killed] = 11
        with trio.fail_after(HANG):
            while watched[killed].used is None:  # noqa: ASYNC110 - set by the watcher thread
                await trio.sleep(0.001)
        assert watched[killed].used == 11
        watcher.unwatch(watched[unwatched])
        figures[unwatched] = 12  # above the ceiling, but no longer watched
        # Let a few rounds pass: the bystander is measured in each.
        rounds = measured[bystander]
        with trio.fail_after(HANG):
            while measured[bystander] < rounds + 5:  # noqa: ASYNC110 - counted by the watcher thread
                await trio.sleep(0.001)
        assert kills == [killed]  # once, although it stays above the ceiling
        assert watched[unwatched].used is None
        assert watched[bystander].used is None
    finally:
        watcher.close()


def test_metric_is_checked():
    with pytest.raises(ValueError, match=r"memory metric must be one of \('uss', 'pss', 'rss'\), not 'vms'"):
        CeilingWatcher(MiB, "vms")
    with pytest.raises(ValueError, match="positive number of bytes"):
        CeilingWatcher(0)


def test_pss_is_refused_where_psutil_cannot_measure_it(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(ValueError, match="memory_metric='pss' is measured on Linux only, and this is darwin"):
        CeilingWatcher(MiB, "pss")


FORK_CHILD = textwrap.dedent(
    """
    import os, subprocess, sys, time
    from trio_parallel_fs._backends.spawn.ceiling import CeilingWatcher

    watcher = CeilingWatcher(2**40)
    sleeper = subprocess.Popen([sys.executable, "-c", {small!r}], stdin=subprocess.PIPE)
    watcher.watch(sleeper.pid, sleeper.kill)
    assert watcher.running
    pid = os.fork()
    if pid == 0:
        # The parent's worker is forgotten, and the thread does not exist here.
        inherited = (watcher.count, watcher.running)
        # The watcher still works in the child: a thread starts, and stops.
        mine = watcher.watch(os.getpid(), lambda: None)
        started = watcher.running
        watcher.unwatch(mine)
        deadline = time.monotonic() + 30
        while watcher.running and time.monotonic() < deadline:
            time.sleep(0.005)
        print(inherited, started, watcher.running, flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    assert watcher.count == 1 and watcher.running  # the parent's is untouched
    sleeper.stdin.close()
    sleeper.wait()
    watcher.close()
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="Windows has no fork")
def test_after_a_fork_the_child_forgets_the_parents_workers():
    result = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", FORK_CHILD.format(small=SMALL)],
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "(0, False) True False", result.stderr


async def test_a_spawned_worker_killed_at_the_ceiling_while_it_preloads_fails_the_open():
    import trio_parallel_fs as tpf

    with pytest.raises(
        tpf.TemplateStartError,
        match=r"^a worker \(pid \d+\) was killed at the memory ceiling while preloading \['preload_hungry'\]: "
        r"it used \d+\.\d MiB \(USS\)",
    ):
        with trio.fail_after(20):  # the preload waits 30 s once it holds its memory
            ceiling = 64 << 20
            async with tpf.open_worker_context(worker_type="spawn", preload=["preload_hungry"], memory_ceiling=ceiling):
                pytest.fail("the open must raise")
