"""The shared memory area under resource limits: a worker or a parent that
cannot grow or map its area (RLIMIT_AS in the worker, RLIMIT_FSIZE in the
parent). The socket carries what the area cannot, and the job runs; only
arguments that fit in no form raise, with an error that says what and why.

The worker's limits are set by jobs in the worker. The parent's limit is set
in a program of its own: never in the pytest process.
"""

from __future__ import annotations

import sys

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("needs Linux: memfd_create, /proc and RLIMIT_AS", allow_module_level=True)

import errno
import os
import resource
import subprocess
import textwrap

import cloudpickle
import numpy as np
import trio

import trio_parallel_fs as tpf
from _trio_parallel_fs_worker import _shm

pytestmark = pytest.mark.skipif(_shm.unsupported_reason() is not None, reason="no shared memory area here")

# The functions below run in the workers, sent by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 1 << 20
HANG = 30  # seconds: a bound for "does not hang", never a speed assertion


@pytest.fixture
def worker_type(area_worker_type):
    return area_worker_type


# --- run in the workers -------------------------------------------------------------


def address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize in /proc/self/status")


def limit_address_space(headroom: int) -> int:
    """Let this worker map at most ``headroom`` more bytes from now on (as an
    init hook or a job might); return its pid."""
    import numpy  # noqa: F401 - before the limit: it maps its libraries when imported

    resource.setrlimit(resource.RLIMIT_AS, (address_space() + headroom, resource.RLIM_INFINITY))
    return os.getpid()


def filled(size: int, fill: int) -> np.ndarray:
    return np.full(size, fill, np.uint8)


def filled_then_limited(size: int, fill: int, headroom: int) -> tuple[int, np.ndarray]:
    """A result made before the limit; then no room left to map the area for it."""
    array = np.full(size, fill, np.uint8)
    return limit_address_space(headroom), array


def checked(array: np.ndarray, fill: int) -> tuple[int, int]:
    """The pid, and the bytes of ``array`` if every one holds ``fill`` (else -1).
    Reductions only: an ``array == fill`` would need as much memory again."""
    right = int(array.min()) == int(array.max()) == fill
    return os.getpid(), array.nbytes if right else -1


def area_mapped() -> int:
    """Bytes of shared memory areas this worker has mapped."""
    total = 0
    with open("/proc/self/maps") as f:
        for line in f:
            if _shm.MEMFD_NAME in line:
                start, end = line.split()[0].split("-")
                total += int(end, 16) - int(start, 16)
    return total


# --- the worker cannot map its area ---------------------------------------------------


async def test_a_result_the_worker_cannot_map_the_area_for_comes_over_the_socket(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        with trio.fail_after(HANG):
            # Through the area, which is lent to us: the next results need it
            # to grow, which the limit forbids.
            first = await ctx.run_sync(filled, 4 * MiB, 1)
            pid, second = await ctx.run_sync(filled_then_limited, 4 * MiB, 2, MiB)
            third_pid, third = await ctx.run_sync(filled_then_limited, 4 * MiB, 3, MiB)
            assert await ctx.run_sync(area_mapped) == 4 * MiB  # the worker never grew it
        assert (first == 1).all() and (second == 2).all() and (third == 3).all()
        assert third_pid == pid  # the worker lived on


async def test_arguments_the_worker_cannot_map_the_area_for_are_read_from_it(worker_type):
    """The area must grow to 60 MiB for the second array (one and a half times
    its 40 MiB): no room to map that in 52 MiB, but room for a 44 MiB copy once
    the 40 MiB mapping is given back."""
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        with trio.fail_after(HANG):
            pid = await ctx.run_sync(limit_address_space, 52 * MiB)
            assert await ctx.run_sync(checked, filled(40 * MiB, 4), 4) == (pid, 40 * MiB)
            assert await ctx.run_sync(area_mapped) == 40 * MiB
            assert await ctx.run_sync(checked, filled(44 * MiB, 5), 5) == (pid, 44 * MiB)
            assert await ctx.run_sync(area_mapped) == 0  # given back for the copy
            # And again, with the copy's memory given back after the job.
            assert await ctx.run_sync(checked, filled(44 * MiB, 6), 6) == (pid, 44 * MiB)


async def test_arguments_that_fit_in_no_form_raise_an_error_that_names_the_area_and_the_limit(worker_type):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        with trio.fail_after(HANG):
            pid = await ctx.run_sync(limit_address_space, 16 * MiB)
            with pytest.raises(MemoryError) as info:
                await ctx.run_sync(checked, filled(64 * MiB, 7), 7)
            # The job never ran; its worker is still there for the next call.
            assert await ctx.run_sync(checked, filled(2 * MiB, 8), 8) == (pid, 2 * MiB)
    message = str(info.value)
    assert f"arguments ({64 * MiB} bytes in 1 buffers) in the shared memory area" in message
    assert f"did not fit in process {pid}'s memory" in message
    assert "mapping the area (" in message and "Cannot allocate memory" in message
    assert "RLIMIT_AS" in message and "raise it, or pass smaller arguments" in message


# --- the parent cannot grow the area --------------------------------------------------


PARENT_WITH_A_FILE_SIZE_LIMIT = """
import resource, sys
sys.path[:0] = [{here!r}]
import numpy as np, trio, trio_parallel_fs as tpf
import test_shm_limits as fns

async def main():
    # A memfd is a file: this limit stops it from growing past 1 MiB (EFBIG).
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
    async with tpf.open_worker_context(worker_type=sys.argv[1]) as ctx:
        for fill in (1, 2, 3):
            pid, count = await ctx.run_sync(fns.checked, np.full(8 << 20, fill, np.uint8), fill)
            result = await ctx.run_sync(fns.filled, 8 << 20, fill)
            print(pid, count, int(np.count_nonzero(result == fill)), ctx.statistics().shared_memory_bytes)

trio.run(main)
"""


def test_a_parent_with_a_file_size_limit_sends_over_the_socket(worker_type, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(PARENT_WITH_A_FILE_SIZE_LIMIT.format(here=os.path.dirname(__file__))))
    done = subprocess.run(
        [sys.executable, str(script), worker_type], capture_output=True, text=True, timeout=HANG, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = [line.split() for line in done.stdout.splitlines()]
    assert len(lines) == 3
    assert len({pid for pid, *_ in lines}) == 1  # one worker did it all
    for _, argument_count, result_count, area_size in lines:
        assert int(argument_count) == int(result_count) == 8 * MiB
        assert int(area_size) == 0  # nothing grew: the socket carried it all


# --- both ends in one process -----------------------------------------------------------


def test_a_reader_that_cannot_map_the_area_reads_copies_from_its_file(monkeypatch):
    """The parent's copy of a result (read_copy) and the worker's views of its
    arguments (read), when mapping fails (ENOMEM, as under RLIMIT_AS)."""
    writer = _shm.SharedArea.create(64 * MiB)
    reader = _shm.SharedArea.attach(os.dup(writer.fileno()), 64 * MiB)
    with writer, reader:
        arrays = [np.arange(MiB, dtype=np.float64), np.full(3 * MiB + 5, 9, np.uint8)]
        descriptor = writer.write(arrays)

        def no_room(*args, **kwargs):
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

        with monkeypatch.context() as patch:
            patch.setattr(_shm.mmap, "mmap", no_room)
            copies = reader.read_copy(descriptor)
            views = reader.read(descriptor)
        for got in (copies, views):
            assert bytes(got[0]) == arrays[0].tobytes()
            assert bytes(got[1]) == arrays[1].tobytes()
        assert reader.size == 0 and not reader.holds_views
        assert reader.release()
