"""The choice between pickle and cloudpickle, in memory."""

from __future__ import annotations

import pickle
import types

import cloudpickle
import workerfns

from _trio_parallel_fs_worker import _pickling


def test_importable_function_with_atomic_args_uses_plain_pickle():
    args = (1, 2.5, "s", b"b", None, True, 1j)
    data, buffers = _pickling.dumps_job(workerfns.add, args)
    assert data == pickle.dumps((workerfns.add, args), _pickling.PROTOCOL) and buffers == []
    assert pickle.loads(data) == (workerfns.add, args)


def test_lambdas_closures_and_containers_go_through_cloudpickle():
    offset = 3
    for fn, args in [(lambda x: x + 1, (1,)), (lambda x: x + offset, (1,)), (workerfns.add, ([1], [2]))]:
        data, buffers = _pickling.dumps_job(fn, args)
        assert data == cloudpickle.dumps((fn, args), _pickling.PROTOCOL) and buffers == []
        loaded_fn, loaded_args = pickle.loads(data)
        assert loaded_fn(*loaded_args) == fn(*args)


def test_functions_from_main_go_by_value():
    main_fn = types.FunctionType((lambda: 7).__code__, {}, "from_main")
    main_fn.__module__ = "__main__"
    main_fn.__qualname__ = "from_main"
    assert not _pickling._importable_function(main_fn)


def test_modules_registered_by_value_disable_the_shortcut():
    cloudpickle.register_pickle_by_value(workerfns)
    try:
        assert not _pickling._importable_function(workerfns.add)
    finally:
        cloudpickle.unregister_pickle_by_value(workerfns)
    assert _pickling._importable_function(workerfns.add)


def test_values():
    assert _pickling.dumps_value(5) == (pickle.dumps(5, _pickling.PROTOCOL), [])
    lam = lambda: 1  # noqa: E731
    data, buffers = _pickling.dumps_value(lam)
    assert pickle.loads(data)() == 1 and buffers == []


def test_large_buffers_travel_beside_the_pickle_without_a_copy():
    import numpy

    from _trio_parallel_fs_worker import _protocol as p

    big = numpy.arange(2**18, dtype=numpy.float64)  # 2 MiB: out of band
    small = numpy.arange(10)  # in the pickle
    data, buffers = _pickling.dumps_value((big, small))
    assert len(buffers) == 1 and buffers[0].nbytes == big.nbytes
    assert numpy.shares_memory(numpy.frombuffer(buffers[0], dtype=big.dtype), big)  # not copied
    parts = p.frame_parts(p.VALUE, data, buffers, flags=2)
    stream = b"".join(bytes(part) for part in parts)
    reader = p.FrameReader()
    reader.feed(stream)
    kind, flags, payload = reader.next_frame()
    assert (kind, flags) == (p.VALUE_BUFFERS, 2)
    pickled, views = p.split_buffers(payload)
    got_big, got_small = pickle.loads(pickled, buffers=views)
    assert (got_big == big).all() and (got_small == small).all()
    assert got_big.flags.writeable and got_big.flags.aligned
