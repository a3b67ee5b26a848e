"""The shared memory area for large buffers: its layout (pure functions),
both ends in one process, and the two ends in two processes. The descriptor
record itself is the protocol's (tests/test_protocol.py)."""

from __future__ import annotations

import gc
import mmap
import os
import pickle
import socket
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import dev_shm

from _trio_parallel_fs_worker import _shm
from _trio_parallel_fs_worker.protocol import descriptor as d

pytestmark = pytest.mark.skipif(_shm.unsupported_reason() is not None, reason="no shared memory area here")

MiB = 1 << 20
BACKENDS = ["memfd", "posix_shm"] if sys.platform.startswith("linux") else ["auto"]


def dumps(obj: object) -> tuple[bytes, list[pickle.PickleBuffer]]:
    buffers: list[pickle.PickleBuffer] = []
    return pickle.dumps(obj, 5, buffer_callback=buffers.append), buffers


def address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


@pytest.fixture(params=BACKENDS)
def pair(request):
    """Two ends of one area in this process: the parent's and a worker's (on a dup of the fd)."""
    parent = _shm.SharedArea.create(64 * MiB, backend=request.param)
    worker = _shm.SharedArea.attach(os.dup(parent.fileno()), 64 * MiB)
    yield parent, worker
    worker.close()
    parent.close()


# --- the layout, without any area ---------------------------------------------


def test_layout_aligns_every_buffer():
    extents, end = _shm.layout([10, 0, 64, 1], start=0)
    assert extents == ((0, 10), (64, 0), (64, 64), (128, 1))
    assert end == 129
    extents, end = _shm.layout([5], start=129)
    assert extents == ((192, 5),)
    assert end == 197


def test_as_raw_takes_contiguous_buffers_in_either_order_and_refuses_others():
    array = np.arange(12.0).reshape(3, 4)
    assert _shm.as_raw(array).nbytes == 96
    assert _shm.as_raw(np.asfortranarray(array)).tobytes() == np.asfortranarray(array).tobytes(order="A")
    assert _shm.as_raw(b"abc").tobytes() == b"abc"
    with pytest.raises(BufferError):
        _shm.as_raw(array[:, ::2])
    assert _shm.total_bytes([array, b"abc", array[:, ::2]]) == 96 + 3 + 48


# --- both ends in one process -----------------------------------------------------

ARRAYS = {
    "C": np.arange(300_000, dtype=np.float64).reshape(600, 500),
    "F": np.asfortranarray(np.arange(300_000, dtype=np.int32).reshape(600, 500)),
    "structured": np.array(
        [(i, i * 0.5, b"x%d" % i) for i in range(50_000)], dtype=[("a", "<i4"), ("b", "<f8"), ("c", "S5")]
    ),
    "zero-size": np.empty((0, 7), dtype=np.complex128),
    "bool": np.arange(100_001) % 3 == 0,
}


@pytest.mark.parametrize("name", list(ARRAYS))
def test_arrays_round_trip_each_way(pair, name: str):
    parent, worker = pair
    array = ARRAYS[name]
    pickled, buffers = dumps(array)
    assert len(buffers) == 1
    assert parent.fits(buffers)
    descriptor = parent.write(buffers)
    # The worker rebuilds the argument on views into the area: no copy.
    argument = pickle.loads(pickled, buffers=worker.read(descriptor))
    np.testing.assert_array_equal(argument, array)
    assert argument.dtype == array.dtype
    assert argument.flags.f_contiguous == array.flags.f_contiguous
    assert argument.flags.writeable and argument.flags.aligned
    if array.nbytes:
        assert worker.size > 0
        assert address(argument) % 64 == 0
    # ... and sends it back as its result; the parent copies it out.
    pickled, buffers = dumps(argument)
    back = worker.write(buffers)
    del argument, buffers  # the pickler's buffers are views of the argument too
    assert worker.release()
    result = pickle.loads(pickled, buffers=parent.read_copy(back))
    np.testing.assert_array_equal(result, array)
    assert result.flags.writeable and result.flags.aligned
    assert result.flags.f_contiguous == array.flags.f_contiguous


def test_bytes_bytearray_and_memoryview_buffers(pair):
    parent, worker = pair
    sent = [b"bytes" * 1000, bytearray(b"array" * 3000), memoryview(b"view" * 5000), b""]
    views = worker.read(parent.write(sent))
    assert [bytes(view) for view in views] == [bytes(buffer) for buffer in sent]
    assert all(not view.readonly for view in views)
    del views
    assert worker.release()
    copies = parent.read_copy(worker.write(sent))
    assert [bytes(copy) for copy in copies] == [bytes(buffer) for buffer in sent]
    assert all(not copy.readonly for copy in copies)


def test_a_copy_out_belongs_to_the_caller(pair):
    parent, worker = pair
    small, large = np.full(1000, 7, np.uint8), np.full(8 * MiB, 9, np.uint8)  # a bytearray, a mapping
    copies = parent.read_copy(worker.write([small, large]))
    worker.write([np.zeros(9 * MiB, np.uint8)])  # the area is reused...
    assert bytes(copies[0]) == bytes(small)  # ... the copies are not
    assert np.frombuffer(copies[1], np.uint8).min() == 9
    rebuilt = np.frombuffer(copies[1], np.uint8)
    assert address(rebuilt) % 64 == 0
    rebuilt[:] = 1  # writable
    assert np.frombuffer(copies[1], np.uint8).max() == 1


def test_several_buffers_in_one_message(pair):
    parent, worker = pair
    value = {"a": ARRAYS["C"], "b": [ARRAYS["F"], ARRAYS["structured"]], "small": np.arange(3)}
    pickled, buffers = dumps(value)
    assert len(buffers) == 4
    got = pickle.loads(pickled, buffers=worker.read(parent.write(buffers)))
    for key in ("a", "small"):
        np.testing.assert_array_equal(got[key], value[key])
    for mine, theirs in zip(got["b"], value["b"], strict=True):
        np.testing.assert_array_equal(mine, theirs)
        assert address(mine) % 64 == 0
    del got, mine  # the loop variable holds the last array
    assert worker.release()


def test_results_go_after_the_arguments_they_may_alias(pair):
    parent, worker = pair
    first, second = np.arange(MiB, dtype=np.int64), np.arange(MiB, dtype=np.int64)[::-1].copy()
    pickled, buffers = dumps((first, second))
    a, b = pickle.loads(pickled, buffers=worker.read(parent.write(buffers)))
    # A job that returns its arguments swapped: writing the result at offset 0
    # would overwrite `a` before it is copied.
    pickled, buffers = dumps((b, a))
    back = worker.write(buffers)
    assert d.decode_descriptor(back).extents[0][0] >= first.nbytes + second.nbytes
    del a, b, buffers
    assert worker.release()
    got_b, got_a = pickle.loads(pickled, buffers=parent.read_copy(back))
    np.testing.assert_array_equal(got_a, first)
    np.testing.assert_array_equal(got_b, second)


def test_non_contiguous_buffers_do_not_fit_and_object_arrays_have_none():
    with _shm.SharedArea.create(64 * MiB) as area:
        strided = np.arange(2 * MiB, dtype=np.uint8)[::2]
        assert not area.fits([pickle.PickleBuffer(strided)])
        with pytest.raises(BufferError):
            area.write([strided])
        assert area.size == 0  # nothing was written
        _, buffers = dumps(np.array([object(), "x"] * 1000, dtype=object))
        assert buffers == []  # object arrays pickle in band: nothing for the area


def test_above_the_cap_the_caller_falls_back():
    with _shm.SharedArea.create(2 * MiB) as area:
        assert area.fits([bytes(2 * MiB)])
        assert area.fits([bytes(MiB), bytes(MiB)])
        assert not area.fits([bytes(MiB + 1), bytes(MiB - 1)])  # alignment padding pushes it over
        with pytest.raises(ValueError, match=r"2 buffers \(2097152 bytes\) do not fit in the shared memory area"):
            area.write([bytes(MiB + 1), bytes(MiB - 1)])
        area.write([bytes(2 * MiB)])
        assert area.size == 2 * MiB


def test_growth_across_messages_and_old_views_stay_valid(pair):
    parent, worker = pair
    sizes = []
    kept = None
    for n in (1, 3, 2, 10, 40):
        data = np.full(n * MiB, n, np.uint8)
        views = worker.read(parent.write([data]))
        assert worker.size == parent.size
        assert np.frombuffer(views[0], np.uint8).max() == n
        sizes.append(parent.size)
        if n == 10:
            # The worker grows the area for a result bigger than the argument
            # while it still holds a view into the old mapping.
            kept = views[0]
            copies = parent.read_copy(worker.write([np.full(30 * MiB, 5, np.uint8)]))
            assert parent.size == worker.size >= 40 * MiB
            assert np.frombuffer(copies[0], np.uint8).min() == 5
            assert bytes(kept[:4]) == b"\n\n\n\n"  # the old mapping still serves the view
            del kept, views
            assert worker.release()
            continue
        del views
        assert worker.release()
    assert sizes[:3] == [MiB, 3 * MiB, 3 * MiB]  # no remap when it fits
    assert sizes == sorted(sizes)
    assert sizes[-1] <= 64 * MiB


def test_release_says_when_the_job_kept_an_argument(pair):
    parent, worker = pair
    pickled, buffers = dumps(np.arange(MiB))
    kept = pickle.loads(pickled, buffers=worker.read(parent.write(buffers)))
    assert not worker.release()  # the next write would change `kept` under it
    with pytest.raises(RuntimeError, match="views of the last message are still out"):
        worker.read(parent.write(buffers))
    assert kept[12345] == 12345
    del kept
    assert worker.release()


def test_release_collects_a_cycle_that_holds_an_argument(pair):
    parent, worker = pair
    pickled, buffers = dumps(np.arange(MiB))
    argument = pickle.loads(pickled, buffers=worker.read(parent.write(buffers)))
    try:
        raise ValueError(argument)
    except ValueError as error:
        caught = error  # the traceback refers to this frame: a cycle once the frame is gone
    del argument
    cycle: list[object] = [caught]
    cycle.append(cycle)
    del caught, cycle
    gc.disable()
    try:
        assert worker.release()
    finally:
        gc.enable()


# --- views and the garbage collector ------------------------------------------------
#
# CPython before 3.12.7 and 3.13.0 segfaults when the garbage collector breaks a
# cycle holding a memoryview and something that exports a buffer from it
# (python/cpython#77894). Each scenario runs in its own interpreter, so that a
# crash is a failed test, not a dead test run; on an older CPython each crashed
# before the area kept its pieces reachable and as_raw stopped exporting from
# memoryviews.

GC_PRELUDE = textwrap.dedent(
    """
    import gc, os
    from _trio_parallel_fs_worker import _shm

    MiB = 1 << 20

    class Box:
        pass

    def in_a_cycle(**refs):
        box = Box()
        box.cycle = box
        box.__dict__.update(refs)
        return box

    parent = _shm.SharedArea.create(64 * MiB)
    worker = _shm.SharedArea.attach(os.dup(parent.fileno()), 64 * MiB)
    """
)

GC_SCENARIOS = {
    # A job kept a slice of its argument in a cycle; its worker closed the area.
    "a view held in a cycle after close": """
        views = worker.read(parent.write([bytearray(2 * MiB)]))
        held = in_a_cycle(kept=views[0][64:128])
        del views
        assert not worker.release()
        worker.close()
        del held
        """,
    # The same, with the area itself in the cycle, never closed.
    "a view held with its area in a cycle": """
        views = worker.read(parent.write([bytearray(2 * MiB)]))
        in_a_cycle(kept=views[0][64:128], area=worker)
        del views, worker
        """,
    # write() refused a memoryview (above the cap), and the error, whose
    # traceback holds write()'s flattened views, was kept in a cycle.
    "a refused write's error in a cycle": """
        try:
            parent.write([memoryview(bytearray(65 * MiB))])
        except ValueError as error:
            in_a_cycle(error=error)
        """,
}


@pytest.mark.parametrize("scenario", list(GC_SCENARIOS))
def test_the_garbage_collector_survives_views_in_cycles(scenario: str):
    code = GC_PRELUDE + textwrap.dedent(GC_SCENARIOS[scenario]) + "gc.collect()\nprint('collected')\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "collected\n", done.stderr


def test_as_raw_flattens_a_memoryview_without_exporting_from_it():
    array = np.arange(12.0).reshape(3, 4)
    flat = memoryview(array).cast("B")
    assert _shm.as_raw(flat) is flat
    for view in (memoryview(array), memoryview(np.empty((0, 3)))):
        raw = _shm.as_raw(view)
        assert (raw.format, raw.ndim, raw.nbytes) == ("B", 1, view.nbytes)
        assert raw.tobytes() == view.tobytes()
        view.release()  # BufferError if `raw` exported from it
        if raw.nbytes:
            assert raw[8:16].cast("d")[0] == 1.0  # still usable: it shares the memory


def test_nothing_appears_in_dev_shm_and_the_fd_goes_with_close():
    before = dev_shm()
    for backend in BACKENDS:
        area = _shm.SharedArea.create(64 * MiB, backend=backend)
        fd = area.fileno()
        area.write([bytes(5 * MiB)])
        assert dev_shm() == before
        if sys.platform.startswith("linux"):
            target = os.readlink(f"/proc/self/fd/{fd}")
            assert target.startswith(("/memfd:tpf-shm", "/dev/shm/tpf-")) and target.endswith("(deleted)")
        area.close()
        assert area.closed
        with pytest.raises(OSError):
            os.fstat(fd)
        with pytest.raises(ValueError, match="closed"):
            area.write([b"x"])
        area.close()  # twice is fine
    assert dev_shm() == before


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="a POSIX shared memory object is sized to its cap at once")
def test_a_descriptor_beyond_the_file_is_refused_not_sigbus():
    with (
        _shm.SharedArea.create(64 * MiB) as parent,
        _shm.SharedArea.attach(os.dup(parent.fileno()), 64 * MiB) as worker,
    ):
        check_beyond_the_file(parent, worker)


def check_beyond_the_file(parent: _shm.SharedArea, worker: _shm.SharedArea) -> None:
    parent.write([bytes(MiB)])
    lying = d.encode_descriptor(d.Descriptor(32 * MiB, ((0, 16),)))
    with pytest.raises(d.DescriptorError, match=r"says the area has 33554432 bytes, but it has 1048576"):
        worker.read(lying)
    beyond_cap = d.encode_descriptor(d.Descriptor(65 * MiB, ()))
    with pytest.raises(d.DescriptorError, match="above its cap"):
        worker.read(beyond_cap)


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="shrinking is sealed on memfds only")
def test_the_memfd_cannot_shrink():
    with _shm.SharedArea.create(8 * MiB) as area:
        area.write([bytes(MiB)])
        with pytest.raises(PermissionError):
            os.ftruncate(area.fileno(), 0)


@pytest.mark.parametrize(
    "prefault",
    [
        pytest.param(
            method,
            marks=pytest.mark.skipif(
                method == "map_populate" and not hasattr(mmap, "MAP_POPULATE"), reason="MAP_POPULATE is Linux's"
            ),
        )
        for method in _shm.PREFAULT_METHODS
    ],
)
def test_every_prefault_method_keeps_the_bytes(prefault: str):
    with _shm.SharedArea.create(128 * MiB, prefault=prefault) as parent:
        with _shm.SharedArea.attach(os.dup(parent.fileno()), 128 * MiB, prefault=prefault) as worker:
            for n in (1, 5, 20):
                data = np.arange(n * MiB, dtype=np.uint8)
                views = worker.read(parent.write([data]))
                assert bytes(views[0]) == data.tobytes()
                del views
                assert worker.release()
                # Growth at the other end keeps what is in the area.
                views = worker.read(parent.write([data]))
                copies = parent.read_copy(worker.write([bytes(25 * MiB), data]))
                assert bytes(views[0]) == data.tobytes() == bytes(copies[1])
                del views
                assert worker.release()


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend must be"):
        _shm.SharedArea.create(MiB, backend="sysv")
    with pytest.raises(ValueError, match="prefault must be one of"):
        _shm.SharedArea.create(MiB, prefault="sometimes")
    with pytest.raises(ValueError, match="cap must be >= 0"):
        _shm.SharedArea.create(-1)
    with pytest.raises(ValueError, match="memory metric must be one of"):
        _shm.area_memory("vss")


# --- two processes ------------------------------------------------------------------

# A stand-in for the worker: over a socket it receives (pickle, descriptor),
# unpickles the argument from the area, and replies with its result the same
# way, plus what it sees of the area's memory.
PEER = textwrap.dedent(
    """
    import pickle, socket, struct, sys
    import numpy as np
    from _trio_parallel_fs_worker import _shm

    area = _shm.SharedArea.attach(int(sys.argv[1]), int(sys.argv[3]))
    sock = socket.socket(fileno=int(sys.argv[2]))

    def receive():
        head = sock.recv(8, socket.MSG_WAITALL)
        if not head:
            return None
        (length,) = struct.unpack("!Q", head)
        return pickle.loads(sock.recv(length, socket.MSG_WAITALL))

    def send(obj):
        data = pickle.dumps(obj)
        sock.sendall(struct.pack("!Q", len(data)) + data)

    while (message := receive()) is not None:
        op, pickled, descriptor = message
        args = pickle.loads(pickled, buffers=area.read(descriptor))
        if op == "copy_and_echo":
            result = (args.copy(), args)
        elif op == "grow":
            result = np.full(args, 3, np.uint8)
        else:
            result = op
        buffers = []
        pickled = pickle.dumps(result, 5, buffer_callback=buffers.append)
        descriptor = area.write(buffers)
        private, uss = area.private_bytes, _shm.area_memory("uss")
        del args, result, buffers
        send((pickled, descriptor, area.release(), private, uss, "trio" in sys.modules))
    area.close()
    """
)


class Peer:
    def __init__(self, area: _shm.SharedArea) -> None:
        self.area = area
        self.sock, theirs = socket.socketpair()
        self.sock.settimeout(60)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PEER, str(area.fileno()), str(theirs.fileno()), str(area.cap)],
            pass_fds=[area.fileno(), theirs.fileno()],
        )
        theirs.close()

    def call(self, op: str, argument: object):
        pickled, buffers = dumps(argument)
        data = pickle.dumps((op, pickled, self.area.write(buffers)))
        self.sock.sendall(struct.pack("!Q", len(data)) + data)
        (length,) = struct.unpack("!Q", self.sock.recv(8, socket.MSG_WAITALL))
        pickled, descriptor, released, private, uss, has_trio = pickle.loads(self.sock.recv(length, socket.MSG_WAITALL))
        assert released and not has_trio
        return pickle.loads(pickled, buffers=self.area.read_copy(descriptor)), private, uss

    def close(self) -> None:
        self.sock.close()  # EOF: the peer exits
        try:
            assert self.proc.wait(timeout=60) == 0
        finally:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def peer():
    with _shm.SharedArea.create(256 * MiB) as area:
        peer = Peer(area)
        try:
            yield peer
        finally:
            peer.close()


def test_round_trips_with_another_process(peer):
    for array in ARRAYS.values():
        (copied, echoed), _, _ = peer.call("copy_and_echo", array)
        np.testing.assert_array_equal(copied, array)
        np.testing.assert_array_equal(echoed, array)
        assert echoed.flags.f_contiguous == array.flags.f_contiguous
        assert echoed.flags.writeable


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/smaps")
def test_memory_the_area_counts_for_in_each_process(peer):
    # The parent writes 8 MiB: both ends map the pages, shared, in no one's USS.
    result, private, uss = peer.call("echo", np.ones(8 * MiB, np.uint8))
    assert result == "echo"
    assert private == 0 and uss == 0
    size = peer.area.size
    # The worker grows the area for a 40 MiB result. Until the parent maps the
    # new pages, they are the worker's alone: private, in its USS.
    result, private, uss = peer.call("grow", 40 * MiB)
    assert result.nbytes == 40 * MiB and result.min() == result.max() == 3
    assert private == peer.area.size - size > 30 * MiB
    assert uss == private
    # Now the parent has mapped them too: shared again.
    assert _shm.area_memory("uss", peer.proc.pid) == 0
    assert _shm.area_memory("uss") == 0
    rss = _shm.area_memory("rss", peer.proc.pid)
    assert rss is not None and rss >= peer.area.size
    pss = _shm.area_memory("pss", peer.proc.pid)
    assert pss is not None and abs(pss - peer.area.size // 2) <= 4 * MiB


def test_counted_bytes_by_metric_and_after_the_peer_caught_up(pair):
    parent, worker = pair
    worker.write([b"r" * (3 * MiB)])  # grown by the worker: only it has the new pages mapped
    size = worker.size
    assert worker.private_bytes == size
    assert (worker.counted_bytes("uss"), worker.counted_bytes("pss"), worker.counted_bytes("rss")) == (
        size,
        size,
        size,
    )
    worker.peer_caught_up()  # the parent read the result (and so mapped the area) before its next job
    assert (worker.counted_bytes("uss"), worker.counted_bytes("pss"), worker.counted_bytes("rss")) == (
        0,
        size // 2,
        size,
    )
    assert not worker.holds_views
    descriptor = parent.write([b"a" * MiB])
    views = worker.read(descriptor)
    assert worker.holds_views
    del views
    assert worker.release() and not worker.holds_views


def address_of(view: memoryview) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(view))


@pytest.mark.parametrize("size", [MiB, 8 * MiB], ids=["bytearray", "huge-page-mapping"])
def test_a_results_block_is_reused_once_the_caller_lets_go_of_it(pair, size):
    parent, worker = pair
    first = parent.read_copy(worker.write([np.full(size, 1, np.uint8)]))[0]
    where = address_of(first)
    held = parent.read_copy(worker.write([np.full(size, 2, np.uint8)]))[0]
    assert address_of(held) != where  # the first one is still the caller's
    del first
    assert parent._keeper.kept_bytes == size
    third = np.frombuffer(parent.read_copy(worker.write([np.full(size, 3, np.uint8)]))[0], np.uint8)
    assert address_of(memoryview(third)) == where  # the block came back and was reused
    assert parent._keeper.kept_bytes == 0
    assert third.min() == third.max() == 3
    third[0] = 9  # the caller's to write
    assert np.frombuffer(held, np.uint8).min() == 2  # untouched by the reuse
    # Much smaller results do not take a big block; closing drops the kept one.
    del held
    assert parent._keeper.kept_bytes == size
    small = parent.read_copy(worker.write([np.full(size // 4, 4, np.uint8)]))[0]
    assert parent._keeper.kept_bytes == size
    assert bytes(small[:2]) == b"\x04\x04"
    parent.close()
    assert parent._keeper.kept_bytes == 0
    del third, small  # given back to a closed keeper: unmapped at once
    assert parent._keeper.kept_bytes == 0


def test_a_result_block_outlives_its_area_while_the_caller_holds_it(pair):
    parent, worker = pair
    result = np.frombuffer(parent.read_copy(worker.write([np.arange(MiB, dtype=np.float64)]))[0])
    parent.close()
    worker.close()
    gc.collect()
    assert result[-1] == MiB - 1


@pytest.mark.skipif(hasattr(mmap, "MAP_POPULATE"), reason="this system has MAP_POPULATE")
def test_map_populate_is_refused_where_there_is_none():
    with pytest.raises(ValueError, match="MAP_POPULATE"):
        _shm.SharedArea.create(MiB, prefault="map_populate")


# --- results lent from the area ------------------------------------------------------


def job(parent, worker, arguments, result):
    """One job: the parent writes ``arguments``, the worker reads them and
    writes ``result`` (a callable of the argument views, giving buffers), and
    the parent lends the result back."""
    views = worker.read(parent.write(arguments))
    buffers = result(views)
    in_place = worker.describe_in_place(buffers)
    descriptor = in_place if in_place is not None else worker.write(buffers)
    del views, buffers
    assert worker.release()
    return parent.lend(descriptor), in_place is not None


def test_lent_results_are_placed_around_and_survive_the_area(pair):
    parent, worker = pair
    first, _ = job(parent, worker, [], lambda views: [np.full(4 * MiB, 1, np.uint8)])
    held = np.frombuffer(first[0], np.uint8)
    del first
    assert parent.lent_bytes == 4 * MiB
    for n in range(2, 6):  # each later job goes around the held result
        got, _ = job(parent, worker, [np.full(MiB, n, np.uint8)], lambda views: [np.full(4 * MiB, 7, np.uint8)])
        assert (np.frombuffer(got[0], np.uint8) == 7).all()
        assert (held == 1).all()
        del got
    assert parent.lent_bytes == 4 * MiB  # the others went as their arrays did
    held[:] = 9  # writable, and ours
    worker.close()
    parent.close()
    assert (held == 9).all()  # valid after both ends closed


def test_a_result_that_is_its_argument_is_lent_where_it_lies(pair):
    parent, worker = pair
    argument = np.arange(MiB, dtype=np.int64)
    got, in_place = job(parent, worker, [argument], lambda views: views)
    assert in_place
    result = np.frombuffer(got[0], np.int64)
    np.testing.assert_array_equal(result, argument)
    # The next job's arguments go around it.
    again, _ = job(parent, worker, [np.zeros(MiB, np.int64)], lambda views: views)
    np.testing.assert_array_equal(result, argument)
    assert not np.frombuffer(again[0], np.int64).any()


def test_a_held_result_loop_uses_two_regions_not_ever_more(pair):
    """``r = await run_sync(f)`` holds each result until the next one comes:
    the worker is sent back to a freed region rather than up the area."""
    parent, worker = pair
    held = None
    for n in range(8):
        if parent.wants_window():
            views = worker.read(parent.write([]))
            assert views == [] and worker.release()
        got = parent.lend(worker.write([np.full(8 * MiB, n, np.uint8)]))
        held = np.frombuffer(got[0], np.uint8)
        del got
        assert (held == n).all()
    assert parent.size <= 20 * MiB


def test_a_result_outside_its_window_is_copied_not_lent(pair):
    parent, worker = pair
    held, _ = job(parent, worker, [], lambda views: [np.full(MiB, 1, np.uint8)])
    worker._window = (0, worker.cap)  # a worker that ignores the rule writes over it
    copied = parent.lend(worker.write([np.full(MiB, 2, np.uint8)]))
    assert parent.lent_bytes == MiB  # the first only
    assert (np.frombuffer(copied[0], np.uint8) == 2).all()
    assert parent.wants_window()  # the next job sets the worker's window again


@pytest.mark.skipif(not hasattr(mmap, "MADV_REMOVE"), reason="MADV_REMOVE is Linux's")
def test_trim_gives_back_every_page_but_the_lent_ones():
    with _shm.SharedArea.create(64 * MiB, backend="memfd") as parent:
        worker = _shm.SharedArea.attach(os.dup(parent.fileno()), 64 * MiB)
        try:
            held, _ = job(parent, worker, [np.ones(8 * MiB, np.uint8)], lambda views: [np.full(4 * MiB, 3, np.uint8)])
            assert parent.resident_bytes() >= 12 * MiB
            parent.trim()
            assert parent.resident_bytes() <= 4 * MiB + 2 * _shm.PAGE
            assert (np.frombuffer(held[0], np.uint8) == 3).all()
            del held
            parent.trim()
            assert parent.resident_bytes() == 0
            # Both ends go on using it: the pages come back as they are touched.
            got, _ = job(parent, worker, [np.full(8 * MiB, 5, np.uint8)], lambda views: [np.array(views[0])])
            assert (np.frombuffer(got[0], np.uint8) == 5).all()
        finally:
            worker.close()


@pytest.mark.skipif(not hasattr(mmap, "MADV_REMOVE"), reason="MADV_REMOVE is Linux's")
def test_a_result_held_after_its_area_closes_keeps_only_its_own_pages():
    """The worker is gone and the caller holds one small result: the rest of
    the area's memory is given back with the area, not with that result."""
    parent = _shm.SharedArea.create(64 * MiB, backend="memfd")
    worker = _shm.SharedArea.attach(os.dup(parent.fileno()), 64 * MiB)
    try:
        held, _ = job(parent, worker, [np.ones(16 * MiB, np.uint8)], lambda views: [np.full(2 * MiB, 3, np.uint8)])
        assert worker.resident_bytes() >= 18 * MiB
        parent.close()
        assert worker.resident_bytes() <= 2 * MiB + 2 * _shm.PAGE  # the same file, seen from the other end
        assert (np.frombuffer(held[0], np.uint8) == 3).all()
    finally:
        worker.close()
