"""The pool's rules against a fake backend (tests/fakebackend.py): resubmission,
retirement, kills, deaths and closing, in milliseconds and without processes.
The contract tests in the other files run the same rules on real workers."""

from __future__ import annotations

import operator
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from fakebackend import FakeBackend

import trio_parallel_fs as tpf
from _trio_parallel_fs_worker import protocol as p
from _trio_parallel_fs_worker.protocol import Retire
from trio_parallel_fs._config import WorkerConfig
from trio_parallel_fs._frontend import WorkerContext
from trio_parallel_fs._pool.pool import PoolClosed


@asynccontextmanager
async def fake_context(*scripts: list, **config) -> AsyncIterator[tuple[WorkerContext, FakeBackend]]:
    async with trio.open_nursery() as nursery:
        backend = FakeBackend(nursery, list(scripts))
        context = WorkerContext(WorkerConfig(**config), _private=True, _backend=backend)
        try:
            with trio.fail_after(10):
                yield context, backend
        finally:
            with trio.fail_after(10):
                await context._aclose()
            nursery.cancel_scope.cancel()


async def test_a_worker_is_reused_while_it_stays():
    async with fake_context(["value", "value", "value"]) as (ctx, backend):
        assert [await ctx.run_sync(operator.add, i, 1) for i in range(3)] == [1, 2, 3]
        assert len(backend.processes) == 1
        assert ctx.statistics().idle_workers == 1


async def test_bye_resubmits_the_job_to_another_worker():
    async with fake_context(["value", "bye"], ["value"]) as (ctx, backend):
        assert await ctx.run_sync(operator.add, 1, 1) == 2
        assert await ctx.run_sync(operator.add, 2, 2) == 4  # the first worker left; the second ran it
        assert len(backend.processes) == 2
        assert ctx.statistics().retired == {"idle": 1}


async def test_a_bye_lost_to_a_reset_resubmits_the_job_too():
    """Windows: the worker's exit with the job unread resets the connection,
    and the reset drops its Bye; a reset and a clean exit say the same."""
    async with fake_context(["value", "bye-lost"], ["value"]) as (ctx, backend):
        assert await ctx.run_sync(operator.add, 1, 1) == 2
        assert await ctx.run_sync(operator.add, 2, 2) == 4
        assert len(backend.processes) == 2
        assert ctx.statistics().retired == {"idle": 1}


async def test_a_reset_with_a_failing_exit_is_still_a_death():
    async with fake_context(["value", ("die", 3)], ["value"]) as (ctx, backend):
        assert await ctx.run_sync(operator.add, 1, 1) == 2
        with pytest.raises(tpf.BrokenWorkerError, match="exit code 3"):
            await ctx.run_sync(operator.add, 2, 2)


async def test_a_bye_right_after_a_reply_retires_the_worker_without_error():
    async with fake_context(["bye-after"], ["value"]) as (ctx, backend):
        assert await ctx.run_sync(operator.add, 1, 1) == 2
        assert await ctx.run_sync(operator.add, 2, 2) == 4
        assert len(backend.processes) == 2
        assert ctx.statistics().retired == {"idle": 1}


@pytest.mark.parametrize("reason", [Retire.MAX_JOBS, Retire.MEMORY, Retire.USER])
async def test_each_retirement_reason_lets_the_worker_go_with_its_result(reason):
    async with fake_context([("retire", reason)], ["value"]) as (ctx, backend):
        assert await ctx.run_sync(operator.mul, 3, 4) == 12
        assert ctx.statistics().retired == {reason.reason: 1}
        assert ctx.statistics().idle_workers == 0
        assert await ctx.run_sync(operator.mul, 3, 5) == 15
        assert len(backend.processes) == 2


async def test_a_failing_retire_hook_fails_the_call_and_the_worker_leaves():
    from fakebackend import _serve  # noqa: F401 - the script sends the hook's error itself

    async with fake_context(["init-failed"], ["value"]) as (ctx, backend):
        with pytest.raises(tpf.WorkerHookError, match="the worker's init hook raised RuntimeError: init went wrong"):
            await ctx.run_sync(operator.add, 1, 2)
        assert ctx.statistics().retired == {"hook_error": 1}
        assert await ctx.run_sync(operator.add, 1, 2) == 3


async def test_kill_on_cancel_kills_the_worker_and_counts_it():
    async with fake_context(["hang"], ["value"]) as (ctx, backend):
        with trio.move_on_after(0.05) as scope:
            await ctx.run_sync(operator.add, 1, 2, kill_on_cancel=True)
        assert scope.cancelled_caught
        assert backend.processes[0].killed
        assert ctx.statistics().retired == {"killed": 1}
        assert await ctx.run_sync(operator.add, 1, 2) == 3


async def test_without_kill_on_cancel_the_call_is_shielded():
    async with fake_context(["value"]) as (ctx, backend):
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await ctx.run_sync(operator.add, 1, 2)  # entry is a checkpoint
        assert backend.processes == []


async def test_death_mid_job_is_a_broken_worker_error_naming_the_code():
    async with fake_context([("die", 3)], ["value"]) as (ctx, backend):
        with pytest.raises(tpf.BrokenWorkerError, match=r"worker process \d+ died with exit code 3 while running"):
            await ctx.run_sync(operator.add, 1, 2)
        assert ctx.statistics().retired == {"died": 1}
        assert await ctx.run_sync(operator.add, 1, 2) == 3


async def test_death_after_init_with_an_init_hook_names_the_job_not_the_hook():
    async with fake_context([("started", -1), ("die", 3)], init=lambda: None) as (ctx, backend):
        with pytest.raises(tpf.BrokenWorkerError, match=r"died with exit code 3 while running _operator\.add\.$"):
            await ctx.run_sync(operator.add, 1, 2)


async def test_death_before_init_returned_names_the_init_hook():
    async with fake_context([("die", 3)], init=lambda: None) as (ctx, backend):
        with pytest.raises(tpf.BrokenWorkerError, match=r"while running its init hook, before _operator\.add\.$"):
            await ctx.run_sync(operator.add, 1, 2)


async def test_a_fresh_worker_above_max_memory_warns_once():
    async with fake_context([("started", 300 * 2**20), ("retire", Retire.MEMORY)], [("started", 300 * 2**20)]) as (
        ctx,
        backend,
    ):
        ctx_config = dict(max_memory=100 * 2**20)
        ctx._pool.config = WorkerConfig(**ctx_config)
        with pytest.warns(RuntimeWarning, match=r"max_memory=100\.0 MiB is below .* measured 300\.0 MiB \(USS\)"):
            assert await ctx.run_sync(operator.add, 1, 2) == 3
        assert await ctx.run_sync(operator.add, 1, 3) == 4  # no second warning (it would be an error here)


async def test_close_waits_for_jobs_in_flight_then_closes_idle_workers():
    results = []
    async with trio.open_nursery() as outer:
        async with fake_context([("slow", 0.05)]) as (ctx, backend):

            async def slow_call():
                results.append(await ctx.run_sync(operator.add, 1, 2))

            outer.start_soon(slow_call)
            await trio.sleep(0.01)
        # The context closed after the job in flight was done.
        assert results == [3]
        assert backend.closed
        assert [process.exitcode for process in backend.processes] == [0]  # EOF made it leave


async def test_the_pool_refuses_work_once_closed():
    async with fake_context() as (ctx, backend):
        await ctx._aclose()
        with pytest.raises(PoolClosed):
            await ctx._pool.run(p.Job(b""), operator.add)
        with pytest.raises(trio.ClosedResourceError, match="this worker context is closed"):
            await ctx.run_sync(operator.add, 1, 2)
        assert backend.processes == []


async def test_a_worker_started_while_the_context_closes_is_killed_not_leaked():
    async with fake_context() as (ctx, backend):
        entered = trio.Event()
        release = trio.Event()

        async def slow_start():
            entered.set()
            await release.wait()

        backend.before_start = slow_start
        errors = []

        async def call():
            try:
                await ctx.run_sync(operator.add, 1, 2)
            except trio.ClosedResourceError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await entered.wait()
            # Another thread closes the pool (as configure_default_context would).
            ctx._pool.close_blocking(1.0)
            backend.closed = False  # let start_worker succeed: the pool itself must refuse
            release.set()
        assert [str(error) for error in errors] == ["this worker context closed while the call waited"]
        assert [process.killed for process in backend.processes] == [True]
        assert ctx.statistics().started_workers == 0


async def test_a_call_waiting_for_a_token_runs_on_the_reconfigured_default_context():
    """configure_default_context() while a call waits for its limiter token: the
    call runs on the new default context instead of failing."""
    limiter = trio.CapacityLimiter(1)
    results = []
    async with trio.open_nursery() as nursery:
        await limiter.acquire()

        async def waiting_call():
            results.append(await tpf.run_sync(operator.add, 20, 22, limiter=limiter))

        nursery.start_soon(waiting_call)
        await trio.sleep(0.05)
        assert await tpf.run_sync(operator.add, 1, 1) == 2  # the default context exists and has a worker
        tpf.configure_default_context(max_jobs=5)
        limiter.release()
    assert results == [42]
    assert tpf.default_context_statistics().started_workers == 1  # the new context ran it
