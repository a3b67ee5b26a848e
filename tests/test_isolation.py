"""Isolation: nothing one worker or its job does to the page plan the
workers of a template share (see _trio_parallel_fs_worker/_page_plan.py) makes
another worker's call fail, wait or grow (issue 22, items 1-3).

Each hostile job attacks the plan with whatever a job can reach, in a real
worker of a real template; then plain calls follow, each on a fresh worker
prepared ahead that has had the time to apply the plan. Behaviour is
asserted, never time: ``fail_after`` only guards against a hang."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import mmap
import os
import signal
import socket
import subprocess
import sys

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("page plans are Linux-only", allow_module_level=True)

import fcntl

import hostilefns
import psutil
import trio
import trio.testing

import trio_parallel_fs as tpf
from _trio_parallel_fs_worker import _page_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20
# Plain calls after each attack, each on a worker prepared after the last.
CALLS = 6
# A fresh worker's USS is a few MiB, plus at most MAX_WRITE_BYTES copied ahead;
# far below the hostile plans' 512 MiB.
USS_BOUND = 128 * MiB
HANG_GUARD = 60

needs_page_plan = pytest.mark.skipif(not _page_plan.supported(), reason="needs Linux 5.14+ (MADV_POPULATE_WRITE)")


def hostile_context() -> tpf.WorkerContext:
    # One job per worker: every call after the first goes to a successor
    # prepared ahead, the worker that applies the plan.
    return tpf.open_worker_context(preload=["hostile_preload"], max_jobs=1)


async def plain_calls(ctx: tpf.WorkerContext, count: int = CALLS) -> list[int]:
    """``count`` calls, each after its prepared worker had a moment without a
    message (it applies the plan then); each one's USS as its job started."""
    sizes = []
    for _ in range(count):
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.05)
        sizes.append(await ctx.run_sync(hostilefns.own_uss, limiter=trio.CapacityLimiter(1)))
    return sizes


def assert_unharmed(ctx: tpf.WorkerContext, sizes: list[int], stderr: str) -> None:
    assert len(sizes) == CALLS
    assert max(sizes) < USS_BOUND, [size // MiB for size in sizes]
    assert "died" not in ctx.statistics().retired, ctx.statistics()
    assert "Traceback" not in stderr, stderr


def state_of(pid: int) -> str:
    try:
        return psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return psutil.STATUS_DEAD


async def wait_stopped_or_gone(pid: int) -> str:
    while (state := state_of(pid)) not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):  # noqa: ASYNC110 - another process
        await trio.sleep(0.005)
    return state


@needs_page_plan
async def test_a_job_that_truncates_the_plan_fails_no_other_call(capfd):
    with trio.fail_after(HANG_GUARD):
        async with hostile_context() as ctx:
            await plain_calls(ctx, 3)  # a plan exists
            done = await ctx.run_sync(hostilefns.truncate_plan)
            assert done, "the job found no plan to attack"
            sizes = await plain_calls(ctx)
    assert_unharmed(ctx, sizes, capfd.readouterr().err)


@needs_page_plan
async def test_a_job_that_overwrites_the_plan_with_garbage_fails_no_other_call(capfd):
    with trio.fail_after(HANG_GUARD):
        async with hostile_context() as ctx:
            await plain_calls(ctx, 3)
            done = await ctx.run_sync(hostilefns.overwrite_plan_with_garbage)
            assert done, "the job found no plan to attack"
            sizes = await plain_calls(ctx)
    assert_unharmed(ctx, sizes, capfd.readouterr().err)


@needs_page_plan
@pytest.mark.parametrize("plans_first", [True, False], ids=["plan_exists", "no_plan_yet"])
async def test_a_job_that_enlarges_the_plan_grows_no_other_worker(capfd, plans_first):
    """A 512 MiB run inside a mapping the template has (hostile_preload),
    written into the plan or, by the worker asked to learn (the first one
    when there is no plan yet), sent as its lesson."""
    with trio.fail_after(HANG_GUARD):
        async with hostile_context() as ctx:
            if plans_first:
                await plain_calls(ctx, 3)
            done = await ctx.run_sync(hostilefns.enlarge_plan)
            assert done, "the job found no plan to attack"
            sizes = await plain_calls(ctx)
    assert_unharmed(ctx, sizes, capfd.readouterr().err)


@needs_page_plan
async def test_a_stopped_job_holding_locks_on_the_plan_delays_no_other_call(capfd, tmp_path):
    marker = trio.Path(tmp_path / "locked")
    with trio.fail_after(HANG_GUARD):
        async with hostile_context() as ctx:
            await plain_calls(ctx, 3)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: ctx.run_sync(
                        hostilefns.lock_plan_and_stop, str(marker), kill_on_cancel=True, limiter=trio.CapacityLimiter(1)
                    )
                )
                while not await marker.exists():  # noqa: ASYNC110 - another process writes it
                    await trio.sleep(0.005)
                stopped = int(await marker.read_text())
                assert await wait_stopped_or_gone(stopped) == psutil.STATUS_STOPPED
                sizes = await plain_calls(ctx)
                # The calls completed while the sibling was stopped, locks held.
                assert state_of(stopped) == psutil.STATUS_STOPPED
                nursery.cancel_scope.cancel()  # kills it (kill_on_cancel)
    assert "killed" in ctx.statistics().retired
    assert_unharmed(ctx, sizes, capfd.readouterr().err)


@needs_page_plan
async def test_a_worker_stopped_while_learning_the_plan_delays_no_other_call(capfd):
    with trio.fail_after(HANG_GUARD):
        async with hostile_context() as ctx:
            # The first worker to leave learns (there is no plan yet); a worker
            # not asked to learn leaves without stopping: try the next.
            for _ in range(2 * _page_plan.RELEARN_AFTER):
                pid = await ctx.run_sync(hostilefns.stop_while_learning)
                if await wait_stopped_or_gone(pid) == psutil.STATUS_STOPPED:
                    break
            else:
                pytest.fail("no worker was asked to learn the plan")
            sizes = await plain_calls(ctx)
            assert state_of(pid) == psutil.STATUS_STOPPED
            # Killed at the context's close with its template's other workers;
            # continued first, so that a stopped process cannot delay that.
            os.kill(pid, signal.SIGCONT)
    assert_unharmed(ctx, sizes, capfd.readouterr().err)


# --- the checks themselves, without processes ------------------------------------

PAGE = _page_plan.PAGE
GiB = 1 << 30
WRITABLE = _page_plan.Mapping(1 << 40, (1 << 40) + GiB, True)
FILE = _page_plan.Mapping(1 << 41, (1 << 41) + GiB, False)
MAPPINGS = [WRITABLE, FILE]


def lesson(writes: list, reads: list) -> bytes:
    return _page_plan.encode_plan(_page_plan.Plan(writes, reads))


def test_the_template_takes_a_lesson_that_holds():
    writes, reads = [(WRITABLE.start, 4 * PAGE)], [(FILE.start + PAGE, PAGE), (FILE.start + 8 * PAGE, 2 * PAGE)]
    assert _page_plan.check_lesson(lesson(writes, reads), MAPPINGS) == (writes, reads)
    assert _page_plan.check_lesson(lesson([], []), MAPPINGS) == ([], [])


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(lesson([(WRITABLE.start, PAGE)], [])[:-1], id="truncated"),
        pytest.param(lesson([(WRITABLE.start, PAGE)], []) + b"\0", id="trailing_bytes"),
        pytest.param(b"\0" * 16 + lesson([], [])[16:], id="wrong_magic"),
        pytest.param(lesson([], [])[:4] + b"\x01\0\0\0" + lesson([], [])[8:], id="old_version"),
        pytest.param(
            _page_plan._HEAD.pack(_page_plan._MAGIC, _page_plan._VERSION, _page_plan.MAX_RUNS + 1, 0)
            + _page_plan._RUN.pack(WRITABLE.start, PAGE) * (_page_plan.MAX_RUNS + 1),
            id="too_many_runs",
        ),
        pytest.param(b"\0" * (_page_plan.MAX_PLAN_BYTES + 1), id="too_large"),
        pytest.param(lesson([(WRITABLE.start + 1, PAGE)], []), id="unaligned_address"),
        pytest.param(lesson([(WRITABLE.start, PAGE + 1)], []), id="unaligned_length"),
        pytest.param(lesson([(WRITABLE.start, 0)], []), id="empty_run"),
        pytest.param(lesson([(WRITABLE.end - PAGE, 2 * PAGE)], []), id="past_the_mapping"),
        pytest.param(lesson([(PAGE, PAGE)], []), id="in_no_mapping"),
        pytest.param(lesson([(FILE.start, PAGE)], []), id="write_run_in_a_file_mapping"),
        pytest.param(lesson([], [(WRITABLE.start, PAGE)]), id="read_run_in_anonymous_memory"),
        pytest.param(lesson([(WRITABLE.start, 512 * MiB)], []), id="writes_over_the_cap"),
        pytest.param(lesson([(WRITABLE.start, 8 * MiB)] * 3, []), id="one_run_thrice_over_the_cap"),
        pytest.param(lesson([], [(FILE.start, 512 * MiB)]), id="reads_over_the_cap"),
    ],
)
def test_the_template_drops_a_lesson_that_does_not_hold_whole(data):
    assert _page_plan.check_lesson(data, MAPPINGS) is None


def steps(plan: _page_plan.Plan, *mappings: list) -> tuple[int, int, int]:
    """Bytes written, bytes read and madvise calls applying ``plan`` would take."""
    found = _page_plan.plan_steps(plan, *(mappings or (MAPPINGS, MAPPINGS)))
    written = sum(length for (_, length), advice in found if advice == _page_plan.MADV_POPULATE_WRITE)
    return written, sum(length for (_, length), _ in found) - written, len(found)


def test_a_worker_applies_at_most_the_caps_whatever_the_plan_says():
    one_big = _page_plan.Plan([(WRITABLE.start, 512 * MiB)], [(FILE.start, 512 * MiB)])
    assert steps(one_big) == (_page_plan.MAX_WRITE_BYTES, _page_plan.MAX_READ_BYTES, 2)
    repeated = _page_plan.Plan([(WRITABLE.start, 4 * MiB)] * 100, [])
    assert steps(repeated) == (_page_plan.MAX_WRITE_BYTES, 0, 4)
    many = _page_plan.Plan([(WRITABLE.start + n * PAGE, PAGE) for n in range(4 * _page_plan.MAX_RUNS)], [])
    assert steps(many)[2] <= _page_plan.MAX_RUNS


def test_a_worker_applies_only_aligned_runs_inside_mappings_the_template_had_and_it_has():
    plan = _page_plan.Plan(
        [(WRITABLE.start + 1, PAGE), (WRITABLE.start, PAGE + 1), (WRITABLE.start, 0), (FILE.start, PAGE), (PAGE, PAGE)],
        [(WRITABLE.start, PAGE), (FILE.end - PAGE, 2 * PAGE)],
    )
    assert steps(plan) == (0, 0, 0)
    fine = _page_plan.Plan([(WRITABLE.start, PAGE)], [(FILE.start, PAGE)])
    assert steps(fine) == (PAGE, PAGE, 2)
    assert steps(fine, MAPPINGS, [FILE]) == (0, PAGE, 1)  # gone from this process since
    assert steps(fine, [WRITABLE], MAPPINGS) == (PAGE, 0, 1)  # not the template's


@needs_page_plan
def test_apply_asks_the_kernel_for_no_more_than_the_caps():
    area = mmap.mmap(-1, 64 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # never touched
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(area))
        asked: list[tuple[int, int, int]] = []
        mappings = _page_plan.read_mappings()
        plan = _page_plan.Plan([(address, 64 * MiB)], [])
        done = _page_plan.apply(plan, mappings, lambda: False, lambda *call: asked.append(call) or 0)
        assert asked == [(address, _page_plan.MAX_WRITE_BYTES, _page_plan.MADV_POPULATE_WRITE)]
        assert done == _page_plan.MAX_WRITE_BYTES
    finally:
        gc.collect()
        area.close()


def sealed_file(data: bytes, seal: bool = True) -> int:
    fd = os.memfd_create("test-plan", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


@needs_page_plan
@pytest.mark.parametrize(
    ("data", "seal", "readable"),
    [
        (lesson([(WRITABLE.start, PAGE)], []), True, True),
        (lesson([(WRITABLE.start, PAGE)], []), False, False),  # anyone could change it while we read
        (lesson([(WRITABLE.start, PAGE)], []) + b"\0" * _page_plan.MAX_PLAN_BYTES, True, False),
        (b"", True, False),
    ],
    ids=["sealed", "unsealed", "too_large", "empty"],
)
def test_a_worker_reads_only_a_sealed_well_formed_plan(data, seal, readable):
    fd = sealed_file(data, seal)
    try:
        assert (_page_plan.read_plan(fd) is not None) == readable
    finally:
        os.close(fd)


@needs_page_plan
@pytest.mark.parametrize("kind", ["garbage", "unsealed", "not_a_file", "closed"])
def test_prefaulting_from_a_bad_plan_file_is_no_prefault_never_an_error(monkeypatch, kind):
    read, write = os.pipe()
    fds = {
        "garbage": lambda: sealed_file(os.urandom(4096)),
        "unsealed": lambda: sealed_file(lesson([(WRITABLE.start, PAGE)], []), seal=False),
        "not_a_file": lambda: os.dup(read),
        "closed": lambda: os.dup(read),
    }
    fd = fds[kind]()
    if kind == "closed":
        os.close(fd)
    monkeypatch.setattr(_page_plan, "_inherited", _page_plan.Inherited(fd, None, _page_plan.read_mappings()))
    try:
        assert _page_plan.apply_plan_while_idle(lambda ms: False) == 0
        assert _page_plan._inherited.plan_fd is None
        if kind != "closed":
            with pytest.raises(OSError):
                os.fstat(fd)  # closed by it
    finally:
        os.close(read)
        os.close(write)


@needs_page_plan
def test_a_learner_never_waits_to_send_its_lesson(monkeypatch):
    """A full queue (nobody reads) or a template gone: no lesson, at once."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    theirs.setblocking(True)
    with contextlib.suppress(BlockingIOError):
        while True:
            theirs.send(b"x" * 1000, socket.MSG_DONTWAIT)
    mappings = _page_plan.read_mappings()
    monkeypatch.setattr(_page_plan, "_inherited", _page_plan.Inherited(None, theirs, mappings))
    _page_plan.learn_before_leaving()
    assert theirs.fileno() == -1  # closed: it sends once
    ours.close()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.close()
    monkeypatch.setattr(_page_plan, "_inherited", _page_plan.Inherited(None, theirs, mappings))
    _page_plan.learn_before_leaving()
    assert theirs.fileno() == -1


def learner_of(owner: _page_plan.PlanOwner) -> socket.socket:
    """Ask ``owner`` for a learner as the template does at a fork; the
    child's end of its lesson socket."""
    sender = owner.before_fork()
    assert sender is not None
    child = sender.dup()  # what the child keeps; the template closes its copy
    owner.forked(12345, sender)
    return child


@needs_page_plan
@pytest.mark.parametrize(
    "bad", [lesson([(WRITABLE.start, 512 * MiB)], []), b"garbage", b""], ids=["512MiB_run", "garbage", "empty"]
)
def test_the_owner_publishes_a_learners_lesson_only_if_it_holds_and_reads_one_per_learner(bad):
    owner = _page_plan.PlanOwner(MAPPINGS)
    good = _page_plan.Plan([(WRITABLE.start, PAGE)], [(FILE.start, PAGE)])
    child = learner_of(owner)  # no plan yet: the first child learns
    try:
        child.send(bad)
        child.send(_page_plan.encode_plan(good))
        owner.read_lessons()
        assert owner.plan_fd is None  # the first did not hold
        assert owner.lessons is None  # and the second is not read: one per learner
        with pytest.raises(OSError):
            child.send(_page_plan.encode_plan(good))
    finally:
        child.close()
    child = learner_of(owner)  # so the next child is asked
    try:
        child.send(_page_plan.encode_plan(good))
        owner.read_lessons()
        assert owner.plan_fd is not None
        assert _page_plan.read_plan(owner.plan_fd) == good
        with pytest.raises(PermissionError):
            os.pwrite(owner.plan_fd, b"x", 0)  # sealed
    finally:
        child.close()
        if owner.plan_fd is not None:
            os.close(owner.plan_fd)


def test_the_module_imports_and_does_nothing_without_fcntl_resource_or_memfd():
    """As in a spawned worker on Windows (where there is no fcntl)."""
    code = (
        "import sys, os\n"
        "sys.modules['fcntl'] = None; sys.modules['resource'] = None\n"
        "del os.memfd_create\n"
        "from _trio_parallel_fs_worker import _page_plan as pf\n"
        "assert not pf.supported() and pf.open_book() is None\n"
        "assert pf.apply_plan_while_idle(lambda ms: False) == 0\n"
        "pf.learn_before_leaving()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
