"""Isolation, round 2: hostile jobs against their own worker's fds, streams,
signals, limits, pickling and process tree.

The rule: whatever a job does, no other worker's call fails, waits or gets
wrong data; the caller's process and the template are untouched; nothing is
left once the context closes (conftest's fixture checks processes and fds).
A job may break its own worker: then its own call fails with a clear error
and the next call gets a fresh worker. What a job leaves in its worker's
global state for that worker's later jobs is by design (docs/isolation.rst),
and not tested as if it were defended.

Attacks run while a sibling call is running on another worker, which waits
for the test's say-so (a file), so "the sibling was unaffected" does not
depend on timing. ``fail_after`` only guards against a hang.
"""

from __future__ import annotations

import sys

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("the attacks use /proc, os.fork and Linux fd numbers", allow_module_level=True)

import asyncio
import functools
import signal
from pathlib import Path

import hostilefns2 as h
import numpy as np
import trio
from conftest import is_dead, wait_dead

import trio_parallel_fs as tpf

HANG_GUARD = 60


async def attack_beside_a_sibling(
    ctx: tpf.WorkerContext, tmp_path: Path, attack, linger: float = 0.0
) -> tuple[object, int]:
    """Start a sibling call on one worker, run ``await attack()`` on another
    while it runs, then (after ``linger`` seconds) let the sibling return. The
    attack's outcome (its value or the exception it raised) and the sibling's
    pid."""
    release = tmp_path / "release-sibling"
    found: dict[str, object] = {}
    async with trio.open_nursery() as nursery:

        async def sibling() -> None:
            found["sibling"] = await ctx.run_sync(
                h.wait_for_file_then_pid, str(release), limiter=trio.CapacityLimiter(1)
            )

        nursery.start_soon(sibling)
        while ctx.statistics().running_workers < 1:  # noqa: ASYNC110 - the sibling's job is on its way
            await trio.sleep(0.005)
        try:
            found["attack"] = await attack()
        except Exception as exc:  # noqa: BLE001 - the attack's outcome, checked by the test
            found["attack"] = exc
        finally:
            await trio.sleep(linger)
            release.touch()
    return found["attack"], found["sibling"]  # type: ignore[return-value]


def one_at_a_time() -> trio.CapacityLimiter:
    return trio.CapacityLimiter(1)


# --- 1. a job that closes its worker's fds ----------------------------------------


@pytest.mark.parametrize("then", ["return", "raise"])
async def test_a_job_that_closes_every_fd_fails_only_its_own_call(worker_type, then, tmp_path):
    with trio.fail_after(HANG_GUARD):
        async with tpf.open_worker_context(worker_type=worker_type) as ctx:
            outcome, sibling = await attack_beside_a_sibling(
                ctx, tmp_path, lambda: ctx.run_sync(h.close_every_fd, then, limiter=one_at_a_time())
            )
            assert isinstance(outcome, tpf.BrokenWorkerError), outcome
            assert "close_every_fd" in str(outcome)
            assert outcome.pid != sibling
            assert await ctx.run_sync(h.echo, 42) == 42
    assert ctx.statistics().retired == {"died": 1}


async def test_a_job_that_closes_its_channel_and_runs_on_is_killed_alone(worker_type, tmp_path):
    """Before: the parent saw end-of-file, waited 2 s for the exit report the
    template could not send (the worker lived on), declared the template
    unresponsive and killed it with every worker: the sibling's call failed
    with "the template process died", the hostile one with "the template
    process did not answer" (spawned: "died with an unknown status")."""
    with trio.fail_after(HANG_GUARD):
        async with tpf.open_worker_context(worker_type=worker_type) as ctx:
            template = ctx.statistics().template_pid
            outcome, sibling = await attack_beside_a_sibling(
                ctx, tmp_path, lambda: ctx.run_sync(h.dup2_over_channel, "null_sleep", limiter=one_at_a_time())
            )
            assert isinstance(outcome, tpf.BrokenWorkerError), outcome
            assert "closed its channel" in str(outcome)
            assert "dup2_over_channel" in str(outcome)
            assert outcome.exitcode == -signal.SIGKILL
            await wait_dead(outcome.pid)
            assert is_dead(outcome.pid)
            assert isinstance(sibling, int)
            assert ctx.statistics().template_pid == template
            assert await ctx.run_sync(h.echo, 42) == 42
    assert ctx.statistics().retired == {"died": 1}


def test_a_job_that_closes_its_channel_and_runs_on_is_killed_alone_under_asyncio():
    async def main() -> tuple[object, object]:
        async with tpf.open_worker_context() as ctx:
            template = ctx.statistics().template_pid
            sibling = asyncio.ensure_future(ctx.run_sync(h.pid_after, 0.2))
            try:
                await ctx.run_sync(h.dup2_over_channel, "null_sleep")
            except tpf.BrokenWorkerError as exc:
                outcome: object = exc
            else:
                outcome = None
            return outcome, (await sibling, ctx.statistics().template_pid == template)

    outcome, (sibling, same_template) = asyncio.run(asyncio.wait_for(main(), HANG_GUARD))
    assert isinstance(outcome, tpf.BrokenWorkerError), outcome
    assert "closed its channel" in str(outcome)
    assert isinstance(sibling, int)
    assert same_template


@pytest.mark.parametrize("what", ["arguments", "result"])
async def test_a_job_that_puts_a_file_on_its_areas_fd_never_gets_wrong_data(area_worker_type, what, tmp_path):
    """Before: the worker mapped the file in place of the area as it grew
    it: the next job's arguments were the file's bytes (a sum of garbage),
    or its result went into the file and the caller read zeros; no error."""
    with trio.fail_after(HANG_GUARD):
        async with tpf.open_worker_context(worker_type=area_worker_type) as ctx:
            lim = one_at_a_time()
            assert await ctx.run_sync(h.total, np.ones(1 << 18), limiter=lim) == 1 << 18  # the area exists
            assert await ctx.run_sync(h.swap_the_area_for_a_file, str(tmp_path / "file"), 16 << 20, limiter=lim)
            # Larger than anything the area held: the worker must map it again.
            with pytest.raises(tpf.BrokenWorkerError, match="died with exit code 1"):
                if what == "arguments":
                    await ctx.run_sync(h.total, np.ones(1 << 20), limiter=lim)
                else:
                    await ctx.run_sync(h.ones, 1 << 20, limiter=lim)
            assert await ctx.run_sync(h.total, np.ones(1 << 20), limiter=lim) == 1 << 20
            assert (await ctx.run_sync(h.ones, 1 << 20, limiter=lim)).sum() == 1 << 20
    assert ctx.statistics().retired == {"died": 1}


@pytest.mark.parametrize("how", ["huge", "past_the_file", "outside_the_window"])
async def test_a_worker_that_lies_about_where_its_result_lies_harms_no_result_the_caller_holds(
    area_worker_type, how, tmp_path
):
    """The descriptor is checked where it is used: an area larger than its
    cap or than its file fails the call (the worker is killed); bytes outside
    the window the worker was given are copied, never lent over results the
    caller holds."""
    with trio.fail_after(HANG_GUARD):
        async with tpf.open_worker_context(worker_type=area_worker_type) as ctx:
            lim = one_at_a_time()
            held = await ctx.run_sync(h.full, 1 << 20, 5.0, limiter=lim)  # lent from the area's start
            if how == "outside_the_window":
                lied = await ctx.run_sync(h.lie_about_the_area, how, 1 << 20, limiter=lim)
                lied[:] = 7.0
                assert ctx.statistics().retired == {}
            else:
                outcome, sibling = await attack_beside_a_sibling(
                    ctx, tmp_path, lambda: ctx.run_sync(h.lie_about_the_area, how, 1 << 20, limiter=lim)
                )
                assert isinstance(outcome, Exception) and "area has" in str(outcome), outcome
                assert isinstance(sibling, int)
                assert ctx.statistics().retired == {"killed": 1}
            assert (held == 5.0).all()
            assert (await ctx.run_sync(h.full, 1 << 21, 2.0, limiter=lim) == 2.0).all()


# F_SEAL_FUTURE_WRITE (Linux 5.1) is not in the fcntl module of every Python.
F_SEAL_FUTURE_WRITE = 0x0010


@pytest.mark.parametrize("seals", [4, F_SEAL_FUTURE_WRITE], ids=["grow", "future_write"])
async def test_a_job_that_seals_its_area_gets_right_values_through_the_socket(area_worker_type, seals):
    """Sealed against growing or new writable mappings, the area cannot take
    larger buffers: they go over the socket, and every value is right."""
    with trio.fail_after(HANG_GUARD):
        async with tpf.open_worker_context(worker_type=area_worker_type) as ctx:
            lim = one_at_a_time()
            assert await ctx.run_sync(h.total, np.ones(1 << 18), limiter=lim) == 1 << 18
            assert await ctx.run_sync(h.seal_the_area, seals, limiter=lim) == "sealed"
            assert await ctx.run_sync(h.total, np.ones(1 << 20), limiter=lim) == 1 << 20
            assert (await ctx.run_sync(h.ones, 1 << 21, limiter=lim)).sum() == 1 << 21
            assert await ctx.run_sync(h.total, np.ones(1 << 21), limiter=lim) == 1 << 21
    assert ctx.statistics().retired == {}


# --- 2. standard streams -----------------------------------------------------------


async def test_a_job_whose_streams_raise_does_not_turn_its_worker_into_a_template(worker_type, tmp_path, capfd):
    """Before: the retiring worker's last flush raised, so its os._exit never
    ran; a forked worker went on in the template's code it was forked from,
    and its shutdown SIGKILLed every sibling (the sibling's call failed)."""
    with trio.fail_after(HANG_GUARD):
        async with tpf.open_worker_context(worker_type=worker_type, max_jobs=2) as ctx:

            async def attack() -> tuple[int, int]:
                hostile = await ctx.run_sync(h.replace_standard_streams, limiter=one_at_a_time())
                assert await ctx.run_sync(h.pid, limiter=one_at_a_time()) == hostile  # its last job
                await wait_dead(hostile)
                return hostile, await ctx.run_sync(h.pid, limiter=one_at_a_time())

            (hostile, after), sibling = await attack_beside_a_sibling(ctx, tmp_path, attack)
            assert isinstance(sibling, int), sibling
            assert len({hostile, after, sibling}) == 3
    assert "died" not in ctx.statistics().retired, ctx.statistics()


async def test_a_job_that_closes_or_floods_the_standard_streams_harms_nothing(worker_type, capfd):
    with trio.fail_after(HANG_GUARD):
        async with tpf.open_worker_context(worker_type=worker_type, max_jobs=3) as ctx:
            lim = one_at_a_time()
            assert await ctx.run_sync(h.shout, 4, limiter=lim) == 4
            worker = await ctx.run_sync(h.close_standard_streams, limiter=lim)
            # Its last job prints to closed streams; it retires and leaves quietly.
            with pytest.raises(OSError):
                await ctx.run_sync(h.print_something, limiter=lim)
            await wait_dead(worker)
            assert await ctx.run_sync(h.print_something, limiter=lim) == "printed"
    out, err = capfd.readouterr()
    assert out.count("y" * 1024) >= 4 * 1024 and "printed by a job" in out
    assert "died" not in ctx.statistics().retired, ctx.statistics()


# --- 3. signals, sessions, forks ------------------------------------------------------


async def test_a_job_that_ignores_signals_is_still_killed_on_cancel_and_at_close(worker_type):
    with trio.fail_after(HANG_GUARD):
        async with tpf.open_worker_context(worker_type=worker_type, grace_period=0.5) as ctx:
            spinner = await ctx.run_sync(h.ignore_signals_and, "return")
            with trio.move_on_after(0.2):
                await ctx.run_sync(h.ignore_signals_and, "spin", kill_on_cancel=True)
            await wait_dead(spinner)
            await ctx.run_sync(h.ignore_signals_and, "return")  # idle at the close, ignoring SIGTERM
    assert ctx.statistics().retired["killed"] == 1


async def test_a_signal_handler_that_raises_in_an_idle_worker_fails_no_call(worker_type, capfd):
    """The exception ends the worker between jobs (its traceback on stderr);
    the next call goes to another worker."""
    with trio.fail_after(HANG_GUARD):
        async with tpf.open_worker_context(worker_type=worker_type) as ctx:
            worker = await ctx.run_sync(h.leave_an_alarm, 0.05)
            await wait_dead(worker)
            assert await ctx.run_sync(h.pid) != worker
    assert "an alarm a job left" in capfd.readouterr().err
    assert ctx.statistics().retired == {"died": 1}


async def test_a_job_cannot_leave_its_workers_process_group(worker_type):
    """The worker leads its group, so setsid() is refused: what the job
    starts stays where its worker's kill reaches it."""
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        assert await ctx.run_sync(h.new_session) == "setsid: Operation not permitted"


async def test_a_python_fork_that_outlives_its_job_ends_with_the_context(worker_type, tmp_path):
    pid_file = tmp_path / "sleeper"
    with trio.fail_after(HANG_GUARD):
        async with tpf.open_worker_context(worker_type=worker_type) as ctx:
            worker = await ctx.run_sync(h.fork_a_sleeper, str(pid_file), 60)
            assert await ctx.run_sync(h.pid) == worker
        await wait_dead(int(pid_file.read_text()))


async def test_a_fork_that_returns_twice_into_the_worker_loop_answers_once(worker_type, capfd):
    """The child's copy of the channel is the null device (an at-fork hook):
    its reply goes nowhere, and it leaves."""
    with trio.fail_after(HANG_GUARD):
        async with tpf.open_worker_context(worker_type=worker_type) as ctx:
            worker = await ctx.run_sync(h.pid)
            assert await ctx.run_sync(h.fork_and_both_return, 5) == 5
            assert await ctx.run_sync(h.pid) == worker
            assert ctx.statistics().retired == {}


async def test_a_job_cannot_forge_a_siblings_exit_report(tmp_path, capfd):
    """Before: the status pipes the template writes each worker's exit to
    could be opened again through /proc/<template>/fd and written to; a
    forged "exited" record failed the sibling's call ("died with signal
    SIGKILL") while it ran on. They are sockets now, which /proc cannot open."""
    with trio.fail_after(HANG_GUARD):
        async with tpf.open_worker_context() as ctx:
            # The lingering second lets the pool's watch over running calls
            # (several looks a second) read a forged report before the
            # sibling answers: without it this could pass by luck, never fail by it.
            outcome, sibling = await attack_beside_a_sibling(
                ctx, tmp_path, lambda: ctx.run_sync(h.forge_exit_reports, limiter=one_at_a_time()), linger=1.0
            )
            assert isinstance(outcome, list) and outcome, outcome  # it found the template's fds
            assert isinstance(sibling, int), sibling
            assert ctx.statistics().retired == {}


# --- 4. resource limits --------------------------------------------------------------------


async def test_a_job_that_lowers_its_fd_limit_gets_its_value_and_its_worker_leaves(worker_type):
    """Before, with max_memory: the worker could not open what measuring its
    memory needs, died after the job returned, and the value was lost."""
    with trio.fail_after(HANG_GUARD):
        async with tpf.open_worker_context(worker_type=worker_type, max_memory=1 << 34) as ctx:
            worker = await ctx.run_sync(h.limit_fds, 3)
            await wait_dead(worker)
            assert await ctx.run_sync(h.pid) != worker
    assert ctx.statistics().retired == {"memory": 1}


async def test_a_job_that_lowers_its_fd_limit_harms_no_other_worker(worker_type, tmp_path):
    with trio.fail_after(HANG_GUARD):
        async with tpf.open_worker_context(worker_type=worker_type) as ctx:
            outcome, sibling = await attack_beside_a_sibling(
                ctx, tmp_path, lambda: ctx.run_sync(h.limit_fds, 3, limiter=one_at_a_time())
            )
            assert isinstance(outcome, int) and isinstance(sibling, int)
            assert (await ctx.run_sync(h.echo, np.arange(1 << 20))).sum() == np.arange(1 << 20).sum()


# --- 5. pickling -------------------------------------------------------------------------


async def test_an_exception_that_cannot_be_formatted_still_comes_back(worker_type):
    """Before: formatting its traceback raised in the worker, which died:
    BrokenWorkerError "died with exit code 1", the exception lost."""
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        worker = await ctx.run_sync(h.pid)
        with pytest.raises(Exception) as info:
            await ctx.run_sync(h.raise_unformattable)
        assert type(info.value).__name__ == "_NotesBomb"
        remote = str(info.value.__cause__)
        # Python 3.13's traceback module formats it anyway, with a line saying so.
        assert "could not be formatted" in remote or "Ignored error getting __notes__" in remote
        assert await ctx.run_sync(h.pid) == worker


@pytest.mark.parametrize(
    ("fn", "args", "message"),
    [
        (h.return_exits_when_pickled, (), "could not be pickled to leave the worker: SystemExit: 7"),
        (h.return_deeply_nested, (100_000,), "could not be pickled to leave the worker: .*recursion"),
    ],
    ids=["exits_when_pickled", "deeply_nested"],
)
async def test_a_result_that_cannot_leave_is_a_type_error_and_the_worker_lives(worker_type, fn, args, message):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        worker = await ctx.run_sync(h.pid)
        with pytest.raises(TypeError, match=message):
            await ctx.run_sync(fn, *args)
        assert await ctx.run_sync(h.pid) == worker


async def test_a_keyboard_interrupt_while_a_result_is_unpickled_is_not_swallowed(worker_type):
    """As from decoding a job's exception: Ctrl-C stays Ctrl-C. Before: the
    call raised TypeError "could not be unpickled in the parent:
    KeyboardInterrupt", so a real Ctrl-C landing there was lost."""
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        worker = await ctx.run_sync(h.pid)
        with pytest.raises(KeyboardInterrupt):
            await ctx.run_sync(h.return_interrupts_when_unpickled)
        assert await ctx.run_sync(h.pid) == worker


async def test_a_job_that_breaks_pickle_in_its_worker_harms_no_other_worker(worker_type, tmp_path):
    """Its own worker stays broken for its later jobs (by design: see
    docs/isolation.rst); every other worker is unaffected."""
    with trio.fail_after(HANG_GUARD):
        async with tpf.open_worker_context(worker_type=worker_type) as ctx:
            outcome, sibling = await attack_beside_a_sibling(
                ctx, tmp_path, lambda: ctx.run_sync(h.break_pickle_dumps, limiter=one_at_a_time())
            )
            assert isinstance(outcome, TypeError) and "could not be unpickled" in str(outcome)
            assert isinstance(sibling, int)


# --- 6. map ----------------------------------------------------------------------------


async def test_a_map_item_that_exits_or_cannot_leave_fails_the_map_and_spares_the_workers(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        worker = await ctx.run_sync(h.pid)
        with pytest.raises(SystemExit) as exited:
            await ctx.map(functools.partial(h.exit_at, 2), range(6), chunksize=3, limiter=one_at_a_time())
        assert exited.value.code == 5
        assert "item 2" in " ".join(getattr(exited.value, "__notes__", []))
        with pytest.raises(TypeError, match="could not be pickled") as unpicklable:
            await ctx.map(functools.partial(h.unpicklable_at, 3), range(6), chunksize=6, limiter=one_at_a_time())
        assert "unpicklable_at" in " ".join(getattr(unpicklable.value, "__notes__", []))
        assert await ctx.map(h.echo, range(6), limiter=one_at_a_time()) == list(range(6))
        assert await ctx.run_sync(h.pid) == worker
