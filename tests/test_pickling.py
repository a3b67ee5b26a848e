"""The choice between pickle and cloudpickle, in memory; and what a function
sent by value looks like in a remote traceback."""

from __future__ import annotations

import pickle
import types

import cloudpickle
import pytest
import workerfns

import trio_parallel_fs as tpf
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
        assert buffers == []
        if fn is workerfns.add:  # by reference: exactly cloudpickle's bytes
            assert data == cloudpickle.dumps((fn, args), _pickling.PROTOCOL)
        else:  # by value: cloudpickle's, but keeping the code's real file name
            assert __file__.encode() in data and b"<dynamic-code>" not in data
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


def test_registering_another_module_by_value_keeps_the_shortcut_for_this_one():
    import recyclefns

    cloudpickle.register_pickle_by_value(recyclefns)
    try:
        assert not _pickling._importable_function(recyclefns.hog)
        assert _pickling._importable_function(workerfns.add)
    finally:
        cloudpickle.unregister_pickle_by_value(recyclefns)


async def test_a_function_sent_by_value_shows_its_file_and_line_in_the_remote_traceback(worker_type):
    def fails():
        raise ValueError("raised by a function sent by value")

    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        with pytest.raises(ValueError) as info:
            await ctx.run_sync(fails)
    text = info.value.__cause__.text
    assert f'File "{__file__}", line {fails.__code__.co_firstlineno + 1}, in fails' in text
    assert 'raise ValueError("raised by a function sent by value")' in text
    assert "<dynamic-code>" not in text
