"""map and imap on local worker contexts and the default context: results,
laziness, errors, cancellation, argument checks; and the chunk sizer's rules,
without processes.

Every test's workers are gone afterwards (conftest); where a test stops a map
early it also checks that nothing of the map still runs or holds a token.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import operator
import os
import pickle
import socket
import sys
import threading

import anyio
import mapfns
import numpy as np
import pytest
import trio
from conftest import wait_until_gone

import trio_parallel_fs as tpf
from trio_parallel_fs._map import (
    GROWTH,
    MAX_CHUNK_ITEMS,
    OVERHEAD_FACTOR,
    TAIL_FLOOR_SECONDS,
    TARGET_BYTES,
    TARGET_SECONDS,
    ChunkSizer,
)

HANG = 60  # seconds: a bound for "does not hang", never a speed assertion


class Counted:
    """An iterator over ``range(n)`` (endless if n is None) that counts how far
    it has been read."""

    def __init__(self, n: int | None = None) -> None:
        self.taken = 0
        self.n = n

    def __iter__(self) -> Counted:
        return self

    def __next__(self) -> int:
        if self.n is not None and self.taken >= self.n:
            raise StopIteration
        self.taken += 1
        return self.taken - 1


def assert_quiet(ctx: tpf.WorkerContext, limiter: trio.CapacityLimiter) -> None:
    """Nothing of a map runs or waits any more."""
    assert ctx.statistics().running_workers == 0
    assert limiter.borrowed_tokens == 0
    assert limiter.statistics().tasks_waiting == 0


# --- results ----------------------------------------------------------------------------


async def test_map_returns_results_in_input_order(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        assert await ctx.map(mapfns.square, range(1000)) == [x * x for x in range(1000)]
        assert await ctx.map(mapfns.square, range(10), chunksize=3) == [x * x for x in range(10)]


async def test_map_zips_several_iterables_like_the_builtin():
    async with tpf.open_worker_context() as ctx:
        got = await ctx.map(operator.add, range(5), iter(range(10, 100)))
        assert got == list(map(operator.add, range(5), range(10, 100)))
        assert await ctx.map(pow, [2, 3], [3, 2], [5, 5]) == [3, 4]


async def test_map_of_nothing_is_an_empty_list():
    async with tpf.open_worker_context() as ctx:
        assert await ctx.map(mapfns.square, []) == []
        assert await ctx.map(mapfns.square, iter(())) == []
        assert ctx.statistics().started_workers == 0


async def test_lambdas_and_partials_travel_by_value():
    async with tpf.open_worker_context() as ctx:
        assert await ctx.map(lambda x: x + 1, range(3)) == [1, 2, 3]
        assert await ctx.map(functools.partial(operator.mul, 10), range(3)) == [0, 10, 20]


async def test_module_level_map_and_imap_use_the_default_context():
    assert await tpf.map(mapfns.square, range(100)) == [x * x for x in range(100)]
    async with tpf.imap(mapfns.square, range(100)) as results:
        assert [r async for r in results] == [x * x for x in range(100)]
    assert tpf.default_context_statistics().started_workers >= 1


async def test_breaking_out_stops_the_map_and_kills_with_kill_on_cancel():
    limiter = trio.CapacityLimiter(2)
    async with tpf.open_worker_context() as ctx:
        fn = functools.partial(mapfns.sleep_then, 30)
        with trio.fail_after(HANG):
            async with ctx.imap(fn, range(100), chunksize=1, kill_on_cancel=True, limiter=limiter) as results:
                # Nothing will come for 30 s: leave the block by an exception.
                with trio.move_on_after(0.2):
                    async for _ in results:
                        pytest.fail("a 30 s item finished")
        assert_quiet(ctx, limiter)
        assert ctx.statistics().retired.get("killed") == 2


async def test_leaving_the_block_early_waits_for_running_chunks_without_kill_on_cancel():
    limiter = trio.CapacityLimiter(2)
    async with tpf.open_worker_context() as ctx:
        fn = functools.partial(mapfns.sleep_then, 0.2)
        async with ctx.imap(fn, Counted(), chunksize=1, limiter=limiter) as results:
            async for _ in results:
                break
        assert_quiet(ctx, limiter)
        assert ctx.statistics().retired == {}


async def test_imap_is_iterated_inside_its_block_and_entered_once():
    async with tpf.open_worker_context() as ctx:
        results = ctx.imap(mapfns.square, range(3))
        with pytest.raises(RuntimeError, match=r"inside its block"):
            await results.__anext__()
        async with results:
            assert [r async for r in results] == [0, 1, 4]
        with pytest.raises(RuntimeError, match=r"entered once"):
            async with results:
                pass


# --- errors -----------------------------------------------------------------------------


def notes(exc: BaseException) -> list[str]:
    return list(getattr(exc, "__notes__", []))


async def test_the_failing_item_is_raised_with_its_index(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        fn = functools.partial(mapfns.fail_on, frozenset({777}))
        with pytest.raises(ValueError, match=r"^item 777 is bad") as info:
            await ctx.map(fn, range(2000))
        assert str(info.value) == "item 777 is bad"
        assert notes(info.value) == ["raised by mapfns.fail_on on item 777 of map (counting from 0)"]
        assert isinstance(info.value.__cause__, tpf.RemoteTraceback)
        assert not hasattr(info.value, "_trio_parallel_fs_map_item")
        # The workers are fine: the next map runs.
        assert await ctx.map(mapfns.square, range(3)) == [0, 1, 4]


async def test_the_first_failing_item_in_input_order_wins():
    """Item 1 fails late (it sleeps first), item 30 at once: map raises item 1's,
    as the builtin map would."""
    async with tpf.open_worker_context() as ctx:
        fn = functools.partial(mapfns.slow_fail_on, frozenset({1, 30}), {1: 0.5})
        with pytest.raises(ValueError, match=r"^item 1 is bad") as info:
            await ctx.map(fn, range(60), chunksize=1)
        assert notes(info.value) == ["raised by mapfns.slow_fail_on on item 1 of map (counting from 0)"]


async def test_imap_gives_the_results_before_the_failing_chunk_then_raises():
    async with tpf.open_worker_context() as ctx:
        fn = functools.partial(mapfns.fail_on, frozenset({25}))
        got = []
        with pytest.raises(ValueError, match=r"^item 25 is bad"):
            async with ctx.imap(fn, range(100), chunksize=5) as results:
                async for result in results:
                    got.append(result)
        assert got == list(range(25))


async def test_an_exception_that_cannot_carry_its_index_names_the_chunk():
    async with tpf.open_worker_context() as ctx:
        with pytest.raises(RuntimeError, match=r"could not travel back") as info:
            await ctx.map(mapfns.raise_unpicklable, range(10, 20), chunksize=4)
        assert notes(info.value) == ["while mapfns.raise_unpicklable ran on one of items 0 to 3 of map, a chunk"]


@pytest.fixture(params=["by reference", "by value"])
def chunk_runner_travels(request):
    """How map's chunk runner travels: by reference, or by value (as it would
    if its module were registered with cloudpickle: a program may do that);
    put back as it was after."""
    import cloudpickle

    from _trio_parallel_fs_worker import _chunks

    by_value = request.param == "by value"
    change = by_value != (_chunks.__name__ in cloudpickle.cloudpickle._PICKLE_BY_VALUE_MODULES)
    register, unregister = cloudpickle.register_pickle_by_value, cloudpickle.unregister_pickle_by_value
    if change:
        (register if by_value else unregister)(_chunks)
    yield request.param
    if change:
        (unregister if by_value else register)(_chunks)


async def test_a_result_that_cannot_leave_the_worker_is_named_by_its_item(worker_type, chunk_runner_travels):
    """Not by the chunk's internal tuple: the message names the user's function
    and the item, the note says where it is, and the workers live on. Also
    once the chunk runner travels by value."""
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        fn = functools.partial(mapfns.lock_on, 6)
        for call in (ctx.map, tpf.map):
            with pytest.raises(
                TypeError,
                match=r"^the result of mapfns.lock_on on item 6, a lock, could not be pickled to leave the worker: "
                r"TypeError: cannot pickle '_thread.lock' object",
            ) as info:
                await call(fn, range(10), chunksize=4)
            assert notes(info.value) == ["raised by mapfns.lock_on on item 6 of map (counting from 0)"]
        assert ctx.statistics().retired == {}


async def test_a_worker_death_is_a_broken_worker_error_naming_the_item(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        fn = functools.partial(mapfns.die_on, 7)
        with pytest.raises(tpf.BrokenWorkerError, match=r"died with exit code 3 while running mapfns.die_on") as info:
            await ctx.map(fn, range(20), chunksize=1)
        assert notes(info.value) == ["while mapfns.die_on ran on item 7 of map (counting from 0)"]
        with pytest.raises(tpf.BrokenWorkerError) as info:
            await ctx.map(fn, range(20), chunksize=5)
        assert notes(info.value) == ["while mapfns.die_on ran on one of items 5 to 9 of map, a chunk"]


async def test_an_input_that_raises_ends_the_map_after_the_items_before():
    def source():
        yield from range(12)
        raise KeyError("the input broke")

    async with tpf.open_worker_context() as ctx:
        got = []
        with pytest.raises(KeyError, match=r"the input broke") as info:
            async with ctx.imap(mapfns.square, source(), chunksize=5) as results:
                async for result in results:
                    got.append(result)
        assert got == [x * x for x in range(12)]
        assert notes(info.value) == ["raised by the input of imap when asked for item 12"]


async def test_an_unpicklable_item_is_named():
    async with tpf.open_worker_context() as ctx:
        items = [1, 2, threading.Lock(), 4]
        with pytest.raises(pickle.PicklingError, match=r"map cannot send mapfns.square to a worker: item 2 \(lock\)"):
            await ctx.map(mapfns.square, items, chunksize=10)


@pytest.mark.parametrize(
    ("chunksize", "error", "message"),
    [
        (0, ValueError, r"chunksize must be at least 1 \(or None: sized automatically\), not 0"),
        (-3, ValueError, r"chunksize must be at least 1"),
        (1.5, TypeError, r"chunksize must be a positive int or None \(sized automatically\), not 1.5"),
        (True, TypeError, r"chunksize must be a positive int or None"),
        ("3", TypeError, r"chunksize must be a positive int or None"),
    ],
)
async def test_bad_chunksize_is_refused_before_anything_starts(chunksize, error, message):
    async with tpf.open_worker_context() as ctx:
        with pytest.raises(error, match=message):
            await ctx.map(mapfns.square, range(3), chunksize=chunksize)
        with pytest.raises(error, match=message):
            ctx.imap(mapfns.square, range(3), chunksize=chunksize)
        assert ctx.statistics().started_workers == 0


async def test_bad_functions_and_inputs_are_refused():
    async def coroutine_function(x):
        return x

    async def agen():
        yield 1

    async with tpf.open_worker_context() as ctx:
        with pytest.raises(TypeError, match=r"is an async function"):
            await ctx.map(coroutine_function, range(3))
        with pytest.raises(TypeError, match=r"needs a callable, not int 5"):
            await ctx.map(5, range(3))
        with pytest.raises(TypeError, match=r"map needs at least one iterable after the function"):
            await ctx.map(mapfns.square)
        with pytest.raises(TypeError, match=r"argument 2 is int 7, which is not iterable$"):
            await ctx.map(operator.add, range(3), 7)
        with pytest.raises(TypeError, match=r"async iterable, which a worker cannot read"):
            ctx.imap(mapfns.square, agen())
        with pytest.raises(TypeError, match=r"limiter must be a trio.CapacityLimiter"):
            await ctx.map(mapfns.square, range(3), limiter=3)
        assert ctx.statistics().started_workers == 0


async def test_a_closed_context_refuses_maps():
    async with tpf.open_worker_context() as ctx:
        pass
    with pytest.raises(trio.ClosedResourceError):
        await ctx.map(mapfns.square, range(3))
    with pytest.raises(trio.ClosedResourceError):
        ctx.imap(mapfns.square, range(3))


# --- cancellation -----------------------------------------------------------------------


async def test_a_map_in_a_cancelled_scope_starts_nothing():
    async with tpf.open_worker_context() as ctx:
        with trio.CancelScope() as scope:
            scope.cancel()
            await ctx.map(mapfns.square, range(3))
        assert scope.cancelled_caught
        assert ctx.statistics().started_workers == 0


async def test_cancelling_a_map_waits_for_running_chunks_or_kills_them():
    limiter = trio.CapacityLimiter(2)
    async with tpf.open_worker_context() as ctx:
        fn = functools.partial(mapfns.sleep_then, 0.3)
        with trio.move_on_after(0.1) as scope:
            await ctx.map(fn, range(50), chunksize=1, limiter=limiter)
        assert scope.cancelled_caught
        assert_quiet(ctx, limiter)
        assert ctx.statistics().retired == {}  # shielded: they finished
        fn = functools.partial(mapfns.sleep_then, 30)
        with trio.fail_after(HANG), trio.move_on_after(0.2) as scope:
            await ctx.map(fn, range(50), chunksize=1, limiter=limiter, kill_on_cancel=True)
        assert scope.cancelled_caught
        assert_quiet(ctx, limiter)
        assert ctx.statistics().retired == {"killed": 2}


async def test_as_many_chunks_run_at_once_as_the_limiter_allows():
    async with tpf.open_worker_context() as ctx:
        fn = functools.partial(mapfns.sleep_then, 0.05)
        pids = await ctx.map(mapfns.pid_of, range(1), chunksize=1)
        assert len(pids) == 1
        got = await ctx.map(fn, range(12), chunksize=1, limiter=trio.CapacityLimiter(3))
        assert got == list(range(12))
        assert ctx.statistics().started_workers == 3


# --- large arrays ------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the shared memory area needs Linux here")
async def test_chunks_of_large_arrays_go_through_the_shared_memory_area():
    arrays = [np.full(1 << 17, float(i)) for i in range(12)]  # 1 MiB each
    async with tpf.open_worker_context() as ctx:
        assert await ctx.map(mapfns.total, arrays, chunksize=4) == [float(i) * (1 << 17) for i in range(12)]
        assert ctx.statistics().shared_memory_bytes > 0
        doubled = await ctx.map(mapfns.double, arrays)
        assert all((d == 2 * a).all() for d, a in zip(doubled, arrays, strict=True))
        assert ctx.statistics().lent_result_bytes > 0  # the results were lent from an area


# --- under every event loop ----------------------------------------------------------
#
# The contract again, each test under Trio, asyncio and uvloop (conftest's ``run``,
# through anyio.run), with anyio's limiter, sleeps and cancel scopes, which mean the
# same under both loops.


def ran(directory) -> set[int]:
    """The items that started (mapfns.record_start), without the half-written."""
    return {int(name) for name in os.listdir(directory) if name.isdigit()}


def test_results_and_streams_under_every_loop(run):
    async def main():
        async with tpf.open_worker_context() as ctx:
            assert await ctx.map(mapfns.square, range(1000)) == [x * x for x in range(1000)]
            assert await ctx.map(operator.add, range(5), iter(range(10, 100))) == [10, 12, 14, 16, 18]
            assert await ctx.map(mapfns.square, []) == []
            async with ctx.imap(mapfns.square, range(500)) as results:
                assert [r async for r in results] == [x * x for x in range(500)]
            # Item 0 sleeps: unordered, the results of other chunks come first.
            slow = functools.partial(mapfns.slow_fail_on, frozenset(), {0: 0.5})
            async with ctx.imap(slow, range(20), ordered=False, chunksize=1) as results:
                got = [r async for r in results]
            assert sorted(got) == list(range(20))
            assert got[0] != 0
        assert await tpf.map(mapfns.square, range(100)) == [x * x for x in range(100)]
        async with tpf.imap(pow, [2, 3], [3, 2]) as results:
            assert [r async for r in results] == [8, 9]

    run(main)


def test_inputs_are_read_a_bounded_window_ahead_under_every_loop(run):
    """With chunks of 5 and 2 tokens, at most 2 * 2 + 1 chunks are read ahead of
    the loop, plus the chunk the loop is in (a slow consumer: the window must
    hold, not the input grow); an endless input is read only as far as used."""

    async def main():
        limiter = anyio.CapacityLimiter(2)
        source, endless = Counted(1000), Counted()
        async with tpf.open_worker_context() as ctx:
            with anyio.fail_after(HANG):
                async with ctx.imap(mapfns.square, source, chunksize=5, limiter=limiter) as results:
                    seen = 0
                    async for result in results:
                        assert result == seen * seen
                        seen += 1
                        assert source.taken - seen <= (2 * 2 + 1) * 5 + 5
                        if seen % 50 == 0:
                            await anyio.sleep(0.01)  # a slow consumer
                assert seen == 1000
                async with ctx.imap(mapfns.square, endless, limiter=limiter) as results:
                    async for result in results:
                        if result >= 10**6:
                            break
            assert_quiet(ctx, limiter)
        assert 1000 < endless.taken < 10**7

    run(main)


@pytest.mark.parametrize("kill_on_cancel", [False, True])
def test_a_failing_item_cancels_the_rest_under_every_loop(run, tmp_path, kill_on_cancel):
    """Item 0 fails while item 1 runs: item 1 finishes first (shielded), or
    with kill_on_cancel its worker is killed at once; no later item starts."""

    async def main():
        limiter = anyio.CapacityLimiter(2)
        fn = functools.partial(mapfns.fail_once_item_1_runs, str(tmp_path), 600 if kill_on_cancel else 0.3)
        async with tpf.open_worker_context() as ctx:
            with anyio.fail_after(HANG), pytest.raises(ValueError, match=r"^item 0 is bad") as info:
                await ctx.map(fn, range(50), chunksize=1, limiter=limiter, kill_on_cancel=kill_on_cancel)
            assert notes(info.value) == ["raised by mapfns.fail_once_item_1_runs on item 0 of map (counting from 0)"]
            assert_quiet(ctx, limiter)
            assert ran(tmp_path) == {0, 1}
            assert ctx.statistics().retired == ({"killed": 1} if kill_on_cancel else {})
            if kill_on_cancel:
                assert not wait_until_gone({int((tmp_path / "1").read_text())}, 5)
            got = []
            with pytest.raises(ValueError, match=r"^item 25 is bad"):
                async with ctx.imap(functools.partial(mapfns.fail_on, {25}), range(100), chunksize=5) as results:
                    async for result in results:
                        got.append(result)
            assert got == list(range(25))

    run(main)


def test_a_worker_death_names_the_items_under_every_loop(run, worker_type):
    async def main():
        async with tpf.open_worker_context(worker_type=worker_type) as ctx:
            fn = functools.partial(mapfns.die_on, 7)
            died = r"died with exit code 3 while running mapfns.die_on"
            with pytest.raises(tpf.BrokenWorkerError, match=died) as info:
                await ctx.map(fn, range(20), chunksize=1)
            assert notes(info.value) == ["while mapfns.die_on ran on item 7 of map (counting from 0)"]
            with pytest.raises(tpf.BrokenWorkerError, match=died) as info:
                async with ctx.imap(fn, range(20), chunksize=5) as results:
                    assert [r async for r in results] == list(range(5))
            assert notes(info.value) == ["while mapfns.die_on ran on one of items 5 to 9 of imap, a chunk"]
            assert await ctx.map(mapfns.square, range(3)) == [0, 1, 4]

    run(main)


def test_cancelling_a_map_waits_for_or_kills_its_chunks_under_every_loop(run, tmp_path):
    """Under Trio and asyncio alike, the cancellation is caught by its scope
    once the running chunks have finished, or been killed."""

    async def main():
        limiter = anyio.CapacityLimiter(2)
        async with tpf.open_worker_context() as ctx:
            with anyio.CancelScope() as scope:
                scope.cancel()
                await ctx.map(mapfns.square, range(3))
            assert scope.cancelled_caught
            with anyio.CancelScope() as scope:
                scope.cancel()
                async with ctx.imap(mapfns.square, range(3)) as results:
                    pytest.fail(f"entered an imap in a cancelled scope: {results}")
            assert scope.cancelled_caught
            assert ctx.statistics().started_workers == 0

            shielded, killed = tmp_path / "shielded", tmp_path / "killed"
            shielded.mkdir()
            killed.mkdir()
            fn = functools.partial(mapfns.record_and_sleep, str(shielded), 0.5)
            with anyio.move_on_after(0.2) as scope:
                await ctx.map(fn, range(50), chunksize=1, limiter=limiter)
            assert scope.cancelled_caught
            assert_quiet(ctx, limiter)
            assert ran(shielded) == {0, 1}
            assert ctx.statistics().retired == {}  # shielded: they finished
            with anyio.fail_after(HANG), anyio.move_on_after(0.3) as scope:
                async with ctx.imap(
                    functools.partial(mapfns.record_and_sleep, str(killed), 600),
                    range(50),
                    chunksize=1,
                    limiter=limiter,
                    kill_on_cancel=True,
                ) as results:
                    async for _ in results:
                        pytest.fail("a 600 s item finished")
            assert scope.cancelled_caught
            assert_quiet(ctx, limiter)
            assert ran(killed) == {0, 1}
            assert ctx.statistics().retired == {"killed": 2}
            assert not wait_until_gone({int((killed / str(i)).read_text()) for i in (0, 1)}, 5)

    run(main)


def test_breaking_out_of_an_imap_leaves_nothing_running_under_every_loop(run, tmp_path):
    async def main():
        limiter = anyio.CapacityLimiter(2)
        async with tpf.open_worker_context() as ctx:
            fn = functools.partial(mapfns.record_and_sleep, str(tmp_path), 0.2)
            async with ctx.imap(fn, Counted(), chunksize=1, limiter=limiter) as results:
                async for _ in results:
                    break
            assert_quiet(ctx, limiter)
            assert len(ran(tmp_path)) <= 4  # the two running, then two more at most
            assert ctx.statistics().retired == {}
            async with ctx.imap(fn, Counted(), chunksize=1, limiter=limiter, kill_on_cancel=True) as results:
                async for _ in results:
                    break
            assert_quiet(ctx, limiter)

    run(main)


# --- asyncio's own ways ---------------------------------------------------------------


@pytest.fixture(params=["asyncio", "uvloop"])
def asyncio_run(request, uvloop_if_installed):
    """``asyncio.run``, or ``uvloop.run`` where it is installed."""
    if request.param == "asyncio":
        return asyncio.run
    if uvloop_if_installed is None:
        pytest.skip("uvloop is not installed")
    return uvloop_if_installed.run


async def both_started(directory) -> None:
    while len(ran(directory)) < 2:  # noqa: ASYNC110 - the workers say they started
        await asyncio.sleep(0.01)


async def map_or_imap(api: str, ctx: tpf.WorkerContext, fn, **options) -> None:
    """``ctx.map(fn, range(50))``, or the same imap's loop, expecting no result."""
    if api == "map":
        await ctx.map(fn, range(50), chunksize=1, **options)
        return
    async with ctx.imap(fn, range(50), chunksize=1, **options) as results:
        async for _ in results:
            pytest.fail("a result came before the cancellation")


async def cancel_once_started(how: str, call, directory) -> None:
    """Await ``call()``, cancelled the way ``how`` says once both its chunks run."""
    if how == "task.cancel":
        task = asyncio.ensure_future(call())
        await both_started(directory)
        task.cancel()
        await task
    elif how == "wait_for":
        await asyncio.wait_for(call(), 1.0)  # warm workers: both chunks start at once
    else:
        async with asyncio.timeout(None) as timeout:  # expired once both run
            watch = asyncio.ensure_future(both_started(directory))
            loop = asyncio.get_running_loop()
            watch.add_done_callback(lambda done: done.cancelled() or timeout.reschedule(loop.time()))
            try:
                await call()
            finally:
                watch.cancel()


@pytest.mark.parametrize("kill_on_cancel", [False, True])
@pytest.mark.parametrize("how", ["task.cancel", "wait_for", "timeout"])
def test_asyncio_cancellation_of_map_and_imap(asyncio_run, how, kill_on_cancel, tmp_path):
    """task.cancel(), asyncio.wait_for and asyncio.timeout cancel a map and an
    imap: its running chunks finish (shielded) or are killed, the chunks
    waiting for a token never start, and the call raises CancelledError (or
    the timeout's TimeoutError) only once nothing of it runs."""
    if how == "timeout" and sys.version_info < (3, 11):
        pytest.skip("asyncio.timeout is Python 3.11+")
    # Without kill_on_cancel the items outlast the timeout: the chunks still
    # run when it expires.
    seconds = 600 if kill_on_cancel else (1.5 if how == "wait_for" else 0.5)
    expected = asyncio.CancelledError if how == "task.cancel" else TimeoutError

    async def main():
        limiter = anyio.CapacityLimiter(2)
        async with tpf.open_worker_context() as ctx:
            assert await ctx.map(mapfns.square, range(4), chunksize=1, limiter=limiter) == [0, 1, 4, 9]
            for api in ("map", "imap"):
                directory = tmp_path / api
                directory.mkdir()
                fn = functools.partial(mapfns.record_and_sleep, str(directory), seconds)
                call = functools.partial(map_or_imap, api, ctx, fn, limiter=limiter, kill_on_cancel=kill_on_cancel)
                with pytest.raises(expected):
                    await cancel_once_started(how, call, directory)
                assert_quiet(ctx, limiter)
                assert ran(directory) == {0, 1}
                if kill_on_cancel:
                    assert not wait_until_gone({int((directory / str(i)).read_text()) for i in (0, 1)}, 5)
                else:
                    assert ctx.statistics().idle_workers == 2
            assert ctx.statistics().retired == ({"killed": 4} if kill_on_cancel else {})

    asyncio_run(asyncio.wait_for(main(), HANG))


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.TaskGroup is Python 3.11+")
def test_maps_in_asyncio_task_groups(tmp_path):
    """A map in a TaskGroup that a sibling's error ends is cancelled (its
    chunks killed, with kill_on_cancel); a map's error ends its group."""

    async def main():
        limiter = anyio.CapacityLimiter(2)
        async with tpf.open_worker_context() as ctx:

            async def fail_once_started():
                while len(ran(tmp_path)) < 2:  # noqa: ASYNC110 - the workers say they started
                    await asyncio.sleep(0.01)
                raise LookupError("the sibling failed")

            fn = functools.partial(mapfns.record_and_sleep, str(tmp_path), 600)
            with pytest.raises(ExceptionGroup) as caught:  # noqa: F821 - Python 3.11+
                async with asyncio.TaskGroup() as group:
                    group.create_task(ctx.map(fn, range(50), chunksize=1, limiter=limiter, kill_on_cancel=True))
                    group.create_task(fail_once_started())
            assert [type(e) for e in caught.value.exceptions] == [LookupError]
            assert_quiet(ctx, limiter)
            assert ran(tmp_path) == {0, 1}
            assert ctx.statistics().retired == {"killed": 2}

            sibling = asyncio.Event()

            async def wait_for_cancellation():
                try:
                    await asyncio.sleep(HANG)
                except asyncio.CancelledError:
                    sibling.set()
                    raise

            with pytest.raises(ExceptionGroup) as caught:  # noqa: F821 - Python 3.11+
                async with asyncio.TaskGroup() as group:
                    group.create_task(ctx.map(functools.partial(mapfns.fail_on, {3}), range(10)))
                    group.create_task(wait_for_cancellation())
            assert [str(e) for e in caught.value.exceptions] == ["item 3 is bad"]
            assert sibling.is_set()

    asyncio.run(asyncio.wait_for(main(), HANG))


# --- a chunk queued behind the running one (local contexts) ----------------------------------


@pytest.fixture
def sent_ahead(request, monkeypatch):
    """Counts the jobs sent to a worker before the reply to the job it runs
    (a map's next chunk, queued): the tests below prove their case happened.
    Only on a Unix socket channel (where there is none, no chunk is queued:
    Windows, and spawned workers over the loopback channel that CI runs)."""
    from trio_parallel_fs._backends.spawn.backend import channel_kind
    from trio_parallel_fs._pool.channel import PooledWorker

    if getattr(socket, "AF_UNIX", None) is None:
        pytest.skip("chunks are queued on Unix socket channels only")
    worker_type = request.getfixturevalue("worker_type") if "worker_type" in request.fixturenames else None
    if worker_type == "spawn" and channel_kind() == "loopback":
        pytest.skip("chunks are queued on Unix socket channels only, not on the loopback channel")
    from trio_parallel_fs._backends.launch import channel_pair

    one, other = channel_pair()  # as the backends make a worker's channel
    with one, other:
        buffer = one.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    if buffer < 64 << 10:
        # A quarter of it may be queued: a chunk with run_chunk pickled by
        # value (once trio_parallel_fs.dask is imported) takes some 2 KiB.
        pytest.skip(f"a socket buffer of {buffer} bytes (macOS's) is too small to queue these chunks")

    count = [0]
    send_ahead = PooledWorker.send_job_ahead

    async def counted(self, job):
        count[0] += 1
        return await send_ahead(self, job)

    monkeypatch.setattr(PooledWorker, "send_job_ahead", counted)
    return count


async def test_a_worker_finds_its_next_chunk_queued_while_it_runs_one(sent_ahead):
    limiter = trio.CapacityLimiter(1)
    async with tpf.open_worker_context() as ctx:
        fn = functools.partial(mapfns.sleep_then, 0.002)
        assert await ctx.map(fn, range(40), chunksize=2, limiter=limiter) == list(range(40))
        # After the first chunk came back (its time unknown before), every
        # chunk but the last went out while the one before it ran.
        assert sent_ahead[0] >= 15
        assert ctx.statistics().started_workers == 1
        assert_quiet(ctx, limiter)


async def test_chunks_too_large_for_the_socket_buffer_are_not_queued(sent_ahead):
    """A queued chunk that the socket does not take whole would wait for the
    worker to read it, while the worker waits for us to read its reply."""
    async with tpf.open_worker_context() as ctx:
        with trio.fail_after(HANG):
            got = await ctx.map(mapfns.square, range(400_000), chunksize=50_000)
        assert got == [x * x for x in range(400_000)]
        assert sent_ahead[0] == 0


@pytest.mark.parametrize("config", [{"max_jobs": 1}, {"retire": mapfns.always}], ids=["max_jobs", "retire_hook"])
def test_a_chunk_queued_on_a_retiring_worker_runs_once_elsewhere(run, worker_type, tmp_path, sent_ahead, config):
    """The worker leaves after its job without reading the chunk queued
    behind it: that chunk goes to another worker, and every item runs once."""

    async def main():
        limiter = anyio.CapacityLimiter(1)
        fn = functools.partial(mapfns.count_run, str(tmp_path), 0.002)
        async with tpf.open_worker_context(worker_type=worker_type, **config) as ctx:
            with anyio.fail_after(HANG):
                assert await ctx.map(fn, range(30), chunksize=2, limiter=limiter) == list(range(30))
            assert ctx.statistics().retired == {"jobs" if "max_jobs" in config else "user": 15}
            assert_quiet(ctx, limiter)
        runs = {int(path.name): path.read_text().split() for path in tmp_path.iterdir()}
        assert sorted(runs) == list(range(30))
        assert all(len(pids) == 1 for pids in runs.values())
        assert len({pids[0] for pids in runs.values()}) == 15  # a worker per chunk
        assert sent_ahead[0] > 0

    run(main)


def test_a_worker_death_with_a_chunk_queued_names_the_running_chunk(run, worker_type, tmp_path, sent_ahead):
    """The chunk queued behind the one its worker died in never started: the
    error names the running chunk's items, and no later item ran."""

    async def main():
        limiter = anyio.CapacityLimiter(1)
        fn = functools.partial(mapfns.record_then_die_on, str(tmp_path), 7, 0.002)
        async with tpf.open_worker_context(worker_type=worker_type) as ctx:
            with anyio.fail_after(HANG), pytest.raises(tpf.BrokenWorkerError, match="exit code 3") as info:
                await ctx.map(fn, range(40), chunksize=2, limiter=limiter)
            assert notes(info.value) == ["while mapfns.record_then_die_on ran on one of items 6 to 7 of map, a chunk"]
            assert ctx.statistics().retired == {"died": 1}
            assert_quiet(ctx, limiter)
            assert await ctx.map(mapfns.square, range(3)) == [0, 1, 4]
        assert ran(tmp_path) == set(range(8))
        assert sent_ahead[0] > 0

    run(main)


def test_an_item_that_ends_its_worker_cleanly_with_a_chunk_queued_runs_once(run, worker_type, tmp_path, sent_ahead):
    """os._exit(0) in an item, the next chunk unread behind it: the unread
    data resets the channel, which without a queued chunk means "left before
    reading the job" (it goes elsewhere). Here the item ended the worker: it
    fails the map and is not run again on another worker (it was)."""

    async def main():
        limiter = anyio.CapacityLimiter(1)
        fn = functools.partial(mapfns.count_then_exit_cleanly_on, str(tmp_path), 3, 0.002)
        async with tpf.open_worker_context(worker_type=worker_type) as ctx:
            with anyio.fail_after(HANG), pytest.raises(tpf.BrokenWorkerError, match="exit code 0"):
                await ctx.map(fn, range(8), chunksize=1, limiter=limiter)
            assert_quiet(ctx, limiter)
        assert (tmp_path / "3").read_text().count("\n") == 1
        assert sent_ahead[0] > 0

    run(main)


@pytest.mark.parametrize("kill_on_cancel", [False, True])
def test_cancelling_a_map_with_a_chunk_queued_leaves_nothing(run, tmp_path, sent_ahead, kill_on_cancel):
    """Without kill_on_cancel the running chunk and the one queued behind it
    (sent already) finish, and no later one starts; with it the worker is
    killed at once. Either way nothing runs or waits afterwards."""

    async def main():
        limiter = anyio.CapacityLimiter(1)
        fn = functools.partial(mapfns.record_and_sleep, str(tmp_path), 0.005)
        async with tpf.open_worker_context() as ctx:
            with anyio.fail_after(HANG):
                with anyio.move_on_after(0.3) as scope:
                    await ctx.map(fn, range(10_000), chunksize=2, limiter=limiter, kill_on_cancel=kill_on_cancel)
                assert scope.cancelled_caught
                assert_quiet(ctx, limiter)
                # Killed if a chunk was in flight as the cancellation came (the
                # lane spends nearly all its time so, but may be between two).
                assert ctx.statistics().retired in (({"killed": 1}, {}) if kill_on_cancel else ({},))
                started = ran(tmp_path)
                assert started == set(range(len(started)))  # in order, none skipped
                await anyio.sleep(0.05)
                assert ran(tmp_path) == started  # nothing more starts
        assert sent_ahead[0] > 0

    run(main)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the shared memory area needs Linux here")
async def test_results_lent_from_the_area_stay_whole_with_a_chunk_queued(sent_ahead):
    """Each chunk's large results go into the worker's area while the next
    chunk waits in its socket (not in the area, which one end writes at a
    time): every result kept keeps its bytes."""
    limiter = trio.CapacityLimiter(1)
    async with tpf.open_worker_context() as ctx:
        results = await ctx.map(mapfns.array_of, range(24), chunksize=2, limiter=limiter)
        assert ctx.statistics().lent_result_bytes > 0
        assert sent_ahead[0] > 0
        arrays = [np.full(1 << 17, float(i)) for i in range(12)]
        doubled = await ctx.map(mapfns.double, arrays, chunksize=1, limiter=limiter)  # arguments in the area
        assert all((d == 2 * a).all() for d, a in zip(doubled, arrays, strict=True))
        assert [float(r[0]) for r in results] == [float(i) for i in range(24)]
        assert all((r == i).all() for i, r in enumerate(results))


# --- the chunk sizer, without processes --------------------------------------------------


def test_sizer_takes_one_item_until_a_chunk_is_measured():
    sizer = ChunkSizer(workers=2, total=None, fixed=None)
    assert [sizer.size(taken) for taken in range(5)] == [1] * 5


def test_sizer_grows_at_most_growth_times_the_largest_measured_chunk():
    sizer = ChunkSizer(workers=2, total=None, fixed=None)
    sizer.measured(1, 1e-7)
    assert sizer.size(1) == GROWTH
    sizer.measured(GROWTH, GROWTH * 1e-7)
    assert sizer.size(5) == GROWTH * GROWTH


def test_sizer_aims_at_the_target_duration():
    sizer = ChunkSizer(workers=2, total=None, fixed=None)
    for size in itertools.islice(itertools.accumulate(itertools.repeat(GROWTH), operator.mul, initial=1), 12):
        sizer.measured(size, size * 1e-5)
    assert sizer.size(10**6) == pytest.approx(TARGET_SECONDS / 1e-5, rel=0.01)


def test_sizer_shrinks_the_last_chunks_to_their_share_of_the_work_left():
    sizer = ChunkSizer(workers=2, total=10_000, fixed=None)
    for size in (1, 4, 16, 64, 256, 1024):
        sizer.measured(size, size * 1e-4)
    assert sizer.size(0) == pytest.approx(TARGET_SECONDS / 1e-4, rel=0.01)  # 100 items, 10 ms
    # 2000 items left of 0.1 ms: 0.2 s, split 2 ways per worker: 50 ms each, above the target.
    assert sizer.size(8000) == pytest.approx(100, rel=0.01)
    # 100 items left: 10 ms, 2.5 ms per share: 25 items.
    assert sizer.size(9900) == pytest.approx(25, rel=0.01)
    # 4 items left: the floor holds chunks at 1 ms, 10 items.
    assert sizer.size(9996) == pytest.approx(TAIL_FLOOR_SECONDS / 1e-4, rel=0.01)


def test_sizer_bounds_the_bytes_of_a_chunk():
    sizer = ChunkSizer(workers=2, total=None, fixed=None)
    sizer.sampled_bytes(1 << 20)
    for size in (1, 4, 16, 64, 256, 1024):
        sizer.measured(size, size * 1e-7)
    assert sizer.size(0) == TARGET_BYTES >> 20


def test_a_fixed_chunksize_is_kept():
    sizer = ChunkSizer(workers=2, total=100, fixed=7)
    sizer.measured(7, 1.0)
    assert [sizer.size(taken) for taken in (0, 50, 99)] == [7, 7, 7]


def test_sizer_makes_chunks_longer_where_a_round_trip_costs_more():
    """On a Dask cluster a task's round trip costs milliseconds: chunks aim at
    OVERHEAD_FACTOR times it rather than the local target."""
    sizer = ChunkSizer(workers=2, total=None, fixed=None)
    for size in (1, 4, 16, 64, 256, 1024, 4096, 16384):
        sizer.measured(size, size * 1e-5, overhead=0.005)
    assert sizer.size(10**6) == pytest.approx(OVERHEAD_FACTOR * 0.005 / 1e-5, rel=0.01)


def test_sizer_takes_the_least_round_trip_so_chunks_cannot_feed_their_own_growth():
    """A chunk's cost beyond its items grows with its size (pickling): taken as
    the target's measure, it would grow the chunks that grow it."""
    sizer = ChunkSizer(workers=2, total=None, fixed=None)
    sizes = [1]
    for _ in range(12):
        size = sizes[-1]
        sizer.measured(size, size * 1e-6, overhead=1e-4 + size * 1e-6)
        sizes.append(sizer.size(10**6))
    assert sizes[-1] == sizes[-2] == round(max(TARGET_SECONDS, OVERHEAD_FACTOR * 1.01e-4) / 1e-6)


def test_sizer_never_exceeds_the_most_items_a_chunk_holds():
    sizer = ChunkSizer(workers=2, total=None, fixed=None)
    for size in (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536):
        sizer.measured(size, size * 1e-9)
    assert sizer.size(10**7) == MAX_CHUNK_ITEMS


def test_a_chunk_reply_is_checked_where_it_is_used():
    """What a worker sends back for a chunk: one result per item, or the
    chunk fails; seconds the sizer cannot use count as 0."""
    from trio_parallel_fs._map import _checked_chunk

    assert _checked_chunk(([1, 4, 9], 0.5), 3) == ([1, 4, 9], 0.5)
    assert _checked_chunk(([1], float("nan")), 1) == ([1], 0.0)
    assert _checked_chunk(([1], -2.0), 1) == ([1], 0.0)
    with pytest.raises(RuntimeError, match=r"^a map chunk of 3 items came back with 2 results$"):
        _checked_chunk(([1, 4], 0.5), 3)
    with pytest.raises(RuntimeError, match=r"^a map chunk of 3 items came back with tuple results$"):
        _checked_chunk(((1, 4, 9), 0.5), 3)
    with pytest.raises(RuntimeError, match=r"^a map chunk of 3 items came back as int$"):
        _checked_chunk(7, 3)
