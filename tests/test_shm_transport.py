"""Large buffers through each worker's shared memory area, with real workers.

Arguments and results of every shape the area takes (C and Fortran order,
structured dtypes, zero-size, bytearray, raw buffers) and every shape it must
refuse (non-contiguous, object dtype, above the cap, the loopback channel):
the values are right either way, and statistics say whether the area was used.
Then faults in the middle of a transfer: a worker killed, a call cancelled with
kill_on_cancel, the parent killed. Nothing is left behind: no process, no fd
(conftest), nothing in /dev/shm (here).
"""

from __future__ import annotations

import sys

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("needs Linux: memfd_create, /proc and signals", allow_module_level=True)

import mmap
import os
import pickle
import signal
import subprocess
import textwrap
import time

import cloudpickle
import numpy as np
import psutil
import trio
from conftest import dev_shm, wait_dead, wait_until_gone

import trio_parallel_fs as tpf
from _trio_parallel_fs_worker import _shm

pytestmark = pytest.mark.skipif(_shm.unsupported_reason() is not None, reason="no shared memory area here")

# The functions below run in the workers, sent by value: importing this module
# there would import pytest and trio into every worker.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 1 << 20
HANG = 30  # seconds: a bound for "does not hang", never a speed assertion


@pytest.fixture
def worker_type(area_worker_type):
    return area_worker_type


@pytest.fixture(autouse=True)
def nothing_in_dev_shm():
    before = dev_shm()
    yield
    assert dev_shm() - before == set(), "a shared memory object was left in /dev/shm"


# --- run in the workers -------------------------------------------------------------


def identity(value):
    return value


def pid():
    return os.getpid()


def scaled(array, factor):
    return array * factor


def make(shape, dtype, order, fill):
    return np.full(shape, fill, dtype=dtype, order=order)


def check_and_fill(array, expected_sum, fill):
    """Prove the argument arrived whole and is writable in the worker, then
    overwrite it (in the area, where the parent's next write goes)."""
    total = float(array.sum())
    array[...] = fill
    return total == expected_sum


def summary(value):
    """What a worker received: type, length, first and last byte, writability."""
    view = memoryview(value).cast("B")
    return type(value).__name__, view.nbytes, view[0], view[-1], view.readonly


def as_raw_buffer(value):
    return pickle.PickleBuffer(value)


def keep(array):
    """Keep a reference to the argument after the job: the area must not be reused."""
    sys.__dict__.setdefault("_kept_by_test", []).append(array)
    return float(array[0])


def die_holding(array):
    float(array.sum())
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_holding(array, path):
    """Hold the argument's view of the area while the parent is killed."""
    import time

    with open(path, "w") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(60)
    return float(array[0])


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


# --- helpers --------------------------------------------------------------------


def area_bytes(ctx) -> int:
    return int(ctx.statistics().shared_memory_bytes)


async def round_trip(ctx, value, **kwargs):
    with trio.fail_after(HANG):
        return await ctx.run_sync(identity, value, **kwargs)


# --- values -------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["C", "F"])
async def test_contiguous_arrays_go_through_the_area_both_ways(worker_type, order):
    array = np.asarray(np.arange(4 * MiB, dtype=np.float64).reshape(2048, -1), order=order)
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        result = await round_trip(ctx, array)
        assert area_bytes(ctx) >= array.nbytes
        assert result.flags.writeable and result.flags.aligned
        assert result.flags.c_contiguous if order == "C" else result.flags.f_contiguous
        np.testing.assert_array_equal(result, array)
        with trio.fail_after(HANG):
            made = await ctx.run_sync(make, (1024, 4096), np.int32, order, 7)
            # The next job writes other bytes into the same area, and the
            # worker overwrites its argument there: results are copies.
            assert await ctx.run_sync(check_and_fill, np.ones(8 * MiB, np.uint8), 8 * MiB, 255)
            assert await ctx.run_sync(check_and_fill, array, float(array.sum()), -1.0)
        np.testing.assert_array_equal(result, array)
        assert made.dtype == np.int32 and made.shape == (1024, 4096) and (made == 7).all()
        assert made.flags.c_contiguous if order == "C" else made.flags.f_contiguous
        result[0, 0] = -5.0  # writable, and ours
        assert array[0, 0] == 0.0
        assert ctx.statistics().retired == {} and ctx.statistics().started_workers == 1


async def test_structured_zero_size_and_several_buffers_in_one_job(worker_type):
    record = np.dtype([("a", np.int64), ("b", np.float32), ("c", "S3")])
    structured = np.zeros(300_000, dtype=record)
    structured["a"] = np.arange(300_000)
    structured["c"] = b"xyz"
    empty = np.zeros((0, 5))
    value = {"s": structured, "empty": empty, "bytes": np.arange(MiB, dtype=np.uint8), "small": np.ones(3)}
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        result = await round_trip(ctx, value)
        assert area_bytes(ctx) > 0
        np.testing.assert_array_equal(result["s"], structured)
        assert result["s"].dtype == record
        assert result["empty"].shape == (0, 5)
        np.testing.assert_array_equal(result["bytes"], value["bytes"])
        np.testing.assert_array_equal(result["small"], value["small"])
        with trio.fail_after(HANG):
            zero = await ctx.run_sync(make, (0,), np.float64, "C", 1.0)
        assert zero.shape == (0,)


async def test_non_contiguous_and_object_arrays_fall_back_to_the_socket(worker_type):
    base = np.arange(8 * MiB, dtype=np.int64).reshape(4096, -1)
    strided = base[::2, ::3]
    objects = np.array([{"i": i} for i in range(200_000)] + [b"x" * (2 * MiB)], dtype=object)
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        with trio.fail_after(HANG):
            assert await ctx.run_sync(check_and_fill, strided, float(strided.sum()), -1)
            assert await ctx.run_sync(summary, objects)
        assert area_bytes(ctx) == 0  # neither had a contiguous buffer to send out of band
        np.testing.assert_array_equal(await round_trip(ctx, strided), strided)
        result = await round_trip(ctx, objects)
        assert result.dtype == object and list(result[:3]) == [{"i": 0}, {"i": 1}, {"i": 2}]
        assert result[-1] == b"x" * (2 * MiB)


async def test_bytes_bytearray_and_raw_buffers(worker_type):
    data = bytearray(os.urandom(16)) * (2 * MiB // 16)
    data[-1] = 7
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        with trio.fail_after(HANG):
            # bytes and bytearray pickle in band (pickle copies them, whatever the size)...
            assert await ctx.run_sync(summary, bytes(data)) == ("bytes", len(data), data[0], 7, True)
            assert await ctx.run_sync(summary, data) == ("bytearray", len(data), data[0], 7, False)
            back = await ctx.run_sync(identity, data)
            assert area_bytes(ctx) == 0
            # ... a PickleBuffer (any contiguous memory) goes out of band: the area.
            # (Of the bytearray, not of a memoryview of it: CPython before 3.12.7
            # segfaults collecting a PickleBuffer of a memoryview in a cycle, as
            # this frame is in one when an assertion fails; python/cpython#77894.)
            raw = pickle.PickleBuffer(data)
            assert await ctx.run_sync(summary, raw) == ("memoryview", len(data), data[0], 7, False)
            assert area_bytes(ctx) >= len(data)
            raw_back = await ctx.run_sync(as_raw_buffer, pickle.PickleBuffer(data))
        assert type(back) is bytearray and back == data
        assert type(raw_back) is memoryview and not raw_back.readonly and bytes(raw_back) == bytes(data)
        data[0] ^= 0xFF  # the result is a copy, not the argument
        assert raw_back[0] != data[0]


async def test_growth_across_jobs_keeps_one_worker(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        with trio.fail_after(HANG):
            first = await ctx.run_sync(pid)
            sizes = []
            for megabytes in (1, 16, 4, 48):
                array = np.full(megabytes * MiB, megabytes, dtype=np.uint8)
                result = await ctx.run_sync(scaled, array, 2)
                assert result.nbytes == array.nbytes and (result == 2 * megabytes).all()
                sizes.append(area_bytes(ctx))
            assert await ctx.run_sync(pid) == first
        assert sizes == sorted(sizes) and sizes[-1] >= 96 * MiB  # 48 MB in, 48 MB out after it
        assert ctx.statistics().retired == {}


async def test_a_result_that_is_its_argument_is_copied_and_the_worker_stays(worker_type):
    array = np.arange(2 * MiB, dtype=np.int32)
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        with trio.fail_after(HANG):
            first = await ctx.run_sync(pid)
            same = await ctx.run_sync(identity, array)
            half = await ctx.run_sync(identity, array[: MiB // 4])  # a view below the threshold: socket
            assert await ctx.run_sync(pid) == first
        np.testing.assert_array_equal(same, array)
        np.testing.assert_array_equal(half, array[: MiB // 4])
        assert ctx.statistics().retired == {}


async def test_above_the_cap_buffers_go_over_the_socket(worker_type):
    array = np.arange(4 * MiB, dtype=np.float32)  # 16 MB
    async with tpf.open_worker_context(worker_type=worker_type, shm_max=4 * MiB) as ctx:
        np.testing.assert_array_equal(await round_trip(ctx, array), array)
        small = np.arange(MiB // 2, dtype=np.float32)  # 2 MB: fits
        np.testing.assert_array_equal(await round_trip(ctx, small), small)
        assert 0 < area_bytes(ctx) <= 4 * MiB


async def test_shm_max_zero_and_a_high_threshold_keep_everything_on_the_socket(worker_type):
    array = np.arange(4 * MiB, dtype=np.float32)
    for config in ({"shm_max": 0}, {"shm_threshold": 64 * MiB}):
        async with tpf.open_worker_context(worker_type=worker_type, **config) as ctx:
            np.testing.assert_array_equal(await round_trip(ctx, array), array)
            np.testing.assert_array_equal(await round_trip(ctx, array), array)
            assert area_bytes(ctx) == 0


async def test_the_loopback_channel_falls_back_to_the_socket(monkeypatch):
    monkeypatch.setenv("TRIO_PARALLEL_FS_CHANNEL", "loopback")
    array = np.arange(4 * MiB, dtype=np.float32)
    async with tpf.open_worker_context(worker_type="spawn") as ctx:
        np.testing.assert_array_equal(await round_trip(ctx, array), array)
        np.testing.assert_array_equal(await round_trip(ctx, array), array)
        assert area_bytes(ctx) == 0


async def test_the_first_large_result_goes_through_the_area(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        with trio.fail_after(HANG):
            first = await ctx.run_sync(make, (4 * MiB,), np.uint8, "C", 3)
        assert area_bytes(ctx) >= 4 * MiB  # the area went out with the first job
        assert ctx.statistics().lent_result_bytes == 4 * MiB
        assert (first == 3).all()


async def test_results_are_lent_from_the_area_and_stay_valid_after_the_worker(worker_type):
    """A result lives in the area while the caller holds it (or any view of
    it): later arguments and results go around it; statistics count it while
    it lives; it outlives the worker that wrote it and the context."""
    array = np.arange(MiB, dtype=np.float64)
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        with trio.fail_after(HANG):
            first = await ctx.run_sync(make, (4 * MiB,), np.uint8, "C", 3)
            echoed = await round_trip(ctx, array)  # an argument returned: no copy in the worker
            view = first[MiB:]
            del first
            second = await ctx.run_sync(make, (4 * MiB,), np.uint8, "C", 4)
            assert await ctx.run_sync(check_and_fill, array, float(array.sum()), -1.0)
            stats = ctx.statistics()
            assert stats.lent_result_bytes == 8 * MiB + array.nbytes
            assert stats.kept_result_bytes == 0
            del second
            assert ctx.statistics().lent_result_bytes == 4 * MiB + array.nbytes
            with pytest.raises(tpf.BrokenWorkerError):
                await ctx.run_sync(kill_self)
            assert ctx.statistics().lent_result_bytes == 0  # the worker's area is gone
    assert (view == 3).all() and view.flags.writeable
    np.testing.assert_array_equal(echoed, array)
    echoed[0] = -1.0  # writable, and ours
    assert array[0] == 0.0


async def test_a_job_that_keeps_its_argument_retires_its_worker(worker_type):
    array = np.full(2 * MiB, 9.0)
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        with trio.fail_after(HANG):
            first = await ctx.run_sync(pid)
            assert await ctx.run_sync(keep, array) == 9.0
            assert ctx.statistics().retired == {"area": 1}
            await wait_dead(first)
            assert await ctx.run_sync(pid) != first
            np.testing.assert_array_equal(await ctx.run_sync(identity, array), array)
        assert ctx.statistics().shared_memory_bytes >= array.nbytes


async def test_many_concurrent_jobs_on_several_workers_get_their_own_values(worker_type):
    arrays = [np.full(3 * MiB, i, dtype=np.int16) for i in range(12)]
    results: dict[int, np.ndarray] = {}
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:

        async def one(i: int) -> None:
            results[i] = await ctx.run_sync(scaled, arrays[i], 3, limiter=limiter)

        limiter = trio.CapacityLimiter(3)
        with trio.fail_after(HANG):
            async with trio.open_nursery() as nursery:
                for i in range(len(arrays)):
                    nursery.start_soon(one, i)
        for i, array in enumerate(arrays):
            assert results[i].shape == array.shape and (results[i] == 3 * i).all(), i
        assert ctx.statistics().started_workers >= 2


# --- faults mid-transfer -----------------------------------------------------------


async def test_a_worker_killed_holding_its_argument_breaks_only_that_call(worker_type):
    array = np.ones(16 * MiB, dtype=np.uint8)
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        with trio.fail_after(HANG):
            with pytest.raises(tpf.BrokenWorkerError, match="SIGKILL"):
                await ctx.run_sync(die_holding, array)
            assert area_bytes(ctx) == 0  # its area went with it
            np.testing.assert_array_equal(await ctx.run_sync(identity, array), array)
        assert ctx.statistics().retired == {"died": 1}


async def test_a_worker_killed_after_writing_its_result_into_the_area(worker_type):
    """The retire hook runs after the result is in the area and before the reply."""
    async with tpf.open_worker_context(worker_type=worker_type, retire=kill_self) as ctx:
        with trio.fail_after(HANG):
            with pytest.raises(tpf.BrokenWorkerError, match="SIGKILL"):
                # Twice: the first large result comes over the socket and brings the area.
                await ctx.run_sync(make, (16 * MiB,), np.uint8, "C", 1)
            with pytest.raises(tpf.BrokenWorkerError, match="SIGKILL"):
                await ctx.run_sync(identity, np.ones(16 * MiB, np.uint8))
        assert area_bytes(ctx) == 0
        assert ctx.statistics().retired == {"died": 2}


async def test_kill_on_cancel_while_the_worker_holds_the_area(worker_type):
    array = np.ones(32 * MiB, dtype=np.uint8)
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        with trio.fail_after(HANG):
            worker = await ctx.run_sync(pid)
            np.testing.assert_array_equal(await ctx.run_sync(identity, array), array)
            # Stopped, it cannot read the job now waiting in its area: the call
            # is cancelled mid-transfer, and the worker killed.
            psutil.Process(worker).suspend()
            with trio.move_on_after(0.3) as scope:
                await ctx.run_sync(identity, array, kill_on_cancel=True)
            assert scope.cancelled_caught
            await wait_dead(worker)
            assert ctx.statistics().retired == {"killed": 1}
            assert area_bytes(ctx) == 0
            np.testing.assert_array_equal(await ctx.run_sync(identity, array), array)


PARENT = """
import os, sys
sys.path[:0] = [{here!r}]
import numpy as np, trio, trio_parallel_fs as tpf
import test_shm_transport as fns

async def main():
    async with tpf.open_worker_context(worker_type=sys.argv[1]) as ctx:
        print(ctx.statistics().template_pid or "", flush=True)
        await ctx.run_sync(fns.sleep_holding, np.ones(32 << 20, np.uint8), sys.argv[2])

trio.run(main)
"""


@pytest.mark.parametrize("worker_type", ["forkserver", "spawn"])
def test_the_parent_killed_mid_transfer_leaves_nothing(worker_type, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(PARENT.format(here=os.path.dirname(os.path.abspath(__file__)))))
    marker = tmp_path / "worker.pid"
    before = dev_shm()
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        parent = subprocess.Popen([sys.executable, str(script), worker_type, str(marker)], stdout=out, stderr=err)
    pids = {parent.pid}
    try:
        deadline = time.monotonic() + HANG
        while not (marker.exists() and marker.read_text().endswith("\n")):
            assert parent.poll() is None, (tmp_path / "err").read_text()
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.02)
        pids |= {int(marker.read_text())}
        pids |= {child.pid for child in psutil.Process(parent.pid).children(recursive=True)}
        parent.kill()
        parent.wait(HANG)
        left = wait_until_gone(pids, 10)
        assert not left, f"still running after the parent was killed: {left}"
        assert dev_shm() - before == set()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in wait_until_gone(pids, 0):
            try:
                process = psutil.Process(pid)
                if "_trio_parallel_fs_worker" in " ".join(process.cmdline()):
                    process.kill()
            except psutil.Error:
                pass


@pytest.mark.skipif(not hasattr(mmap, "MADV_REMOVE"), reason="areas are trimmed on Linux only")
async def test_an_idle_area_gives_its_memory_back_but_not_what_the_caller_holds(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type, shm_idle=0.2) as ctx:
        with trio.fail_after(HANG):
            held = await ctx.run_sync(make, (8 * MiB,), np.uint8, "C", 3)
            dropped = await ctx.run_sync(make, (32 * MiB,), np.uint8, "C", 4)
            del dropped
            assert area_bytes(ctx) >= 40 * MiB
            for _ in range(200):  # trimmed by a thread of this process  # noqa: ASYNC110
                if area_bytes(ctx) <= 9 * MiB:
                    break
                await trio.sleep(0.05)
        assert (held == 3).all()
        assert ctx.statistics().lent_result_bytes == 8 * MiB
        with trio.fail_after(HANG):
            again = await ctx.run_sync(make, (32 * MiB,), np.uint8, "C", 5)  # the pages come back
        assert (again == 5).all() and (held == 3).all()
        assert ctx.statistics().started_workers == 1
