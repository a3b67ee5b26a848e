"""The choice between pickle and cloudpickle, in memory; and what a function
sent by value looks like in a remote traceback."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
import types

import cloudpickle
import numpy as np
import pytest
import trio
import workerfns

import trio_parallel_fs as tpf
from _trio_parallel_fs_worker import codec


def test_importable_function_with_atomic_args_uses_plain_pickle():
    args = (1, 2.5, "s", b"b", None, True, 1j)
    data, buffers = codec.dumps_job(workerfns.add, args)
    assert data == pickle.dumps((workerfns.add, args), codec.PROTOCOL) and buffers == []
    assert pickle.loads(data) == (workerfns.add, args)


def test_lambdas_closures_and_containers_go_through_cloudpickle():
    offset = 3
    for fn, args in [(lambda x: x + 1, (1,)), (lambda x: x + offset, (1,)), (workerfns.add, ([1], [2]))]:
        data, buffers = codec.dumps_job(fn, args)
        assert buffers == []
        if fn is workerfns.add:  # by reference: exactly cloudpickle's bytes
            assert data == cloudpickle.dumps((fn, args), codec.PROTOCOL)
        else:  # by value: cloudpickle's, but keeping the code's real file name
            assert __file__.encode() in data and b"<dynamic-code>" not in data
        loaded_fn, loaded_args = pickle.loads(data)
        assert loaded_fn(*loaded_args) == fn(*args)


def test_functions_from_main_go_by_value():
    main_fn = types.FunctionType((lambda: 7).__code__, {}, "from_main")
    main_fn.__module__ = "__main__"
    main_fn.__qualname__ = "from_main"
    assert not codec._importable_function(main_fn)


def test_modules_registered_by_value_disable_the_shortcut():
    cloudpickle.register_pickle_by_value(workerfns)
    try:
        assert not codec._importable_function(workerfns.add)
    finally:
        cloudpickle.unregister_pickle_by_value(workerfns)
    assert codec._importable_function(workerfns.add)


def test_values():
    assert codec.dumps_value(5) == (pickle.dumps(5, codec.PROTOCOL), [])
    lam = lambda: 1  # noqa: E731
    data, buffers = codec.dumps_value(lam)
    assert pickle.loads(data)() == 1 and buffers == []


def test_large_buffers_travel_beside_the_pickle_without_a_copy():
    import numpy

    from _trio_parallel_fs_worker.protocol import framing as p

    big = numpy.arange(2**18, dtype=numpy.float64)  # 2 MiB: out of band
    small = numpy.arange(10)  # in the pickle
    data, buffers = codec.dumps_value((big, small))
    assert len(buffers) == 1 and buffers[0].nbytes == big.nbytes
    assert numpy.shares_memory(numpy.frombuffer(buffers[0], dtype=big.dtype), big)  # not copied
    parts = p.frame_parts(p.VALUE, data, buffers, flags=2)
    stream = b"".join(bytes(part) for part in parts)
    reader = p.FrameReader()
    reader.feed(stream)
    kind, flags, payload = reader.next_frame()
    assert (kind, flags) == (p.VALUE_BUFFERS, 2)
    pickled, views = p.split_buffers(payload)
    got_big, got_small = codec.loads_value(pickled, views)
    assert (got_big == big).all() and (got_small == small).all()
    assert got_big.flags.writeable and got_big.flags.aligned


def test_registering_another_module_by_value_keeps_the_shortcut_for_this_one():
    import recyclefns

    cloudpickle.register_pickle_by_value(recyclefns)
    try:
        assert not codec._importable_function(recyclefns.hog)
        assert codec._importable_function(workerfns.add)
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


# --- numpy arrays: the C pickler for plain ones, cloudpickle for the rest ---------------


class _CloudpickleSpy:
    """Records every object cloudpickle is asked to pickle (and still pickles it)."""

    def __init__(self, real):
        self.real = real
        self.calls = []

    def __call__(self, obj, buffer_callback=None):
        self.calls.append(obj)
        return self.real(obj, buffer_callback)


@pytest.fixture
def cloudpickled(monkeypatch):
    spy = _CloudpickleSpy(codec._cloudpickle_dumps)
    monkeypatch.setattr(codec, "_cloudpickle_dumps", spy)
    return spy


def _structured():
    record = np.dtype([("a", np.int64), ("b", np.float32), ("c", "S3"), ("v", np.float32, (3,))])
    array = np.zeros(10_000, dtype=record)  # 270 kB: out of band
    array["a"] = np.arange(10_000)
    array["c"] = b"xyz"
    array["v"] = 1.5
    return array


# Arrays of plain numpy dtypes, large (out of band) and small (in the pickle).
PLAIN_ARRAYS = {
    "C": lambda: np.arange(2**17, dtype=np.float64).reshape(256, -1),  # 1 MiB
    "F": lambda: np.asfortranarray(np.arange(2**17, dtype=np.float64).reshape(256, -1)),
    "small": lambda: np.arange(10, dtype=np.int16),
    "0-d": lambda: np.array(3.5),
    "zero-size": lambda: np.zeros((0, 5)),
    "strided": lambda: np.arange(2**18, dtype=np.int64).reshape(512, -1)[::2, ::3],  # copied into the pickle
    "structured": _structured,
    "titled": lambda: np.ones(4, dtype=np.dtype({"names": ["a"], "formats": ["f8"], "titles": ["the a"]})),
    "datetime": lambda: np.arange(100_000).astype("M8[s]"),
    "unicode": lambda: np.array(["a", "bcd"] * 20_000),
    "complex-bool": lambda: np.array([1 + 2j, 3j]) * np.array([True, False]),
}


def assert_same_array(got, want):
    assert type(got) is type(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.flags.forc:  # the same memory order
        assert (got.flags.c_contiguous, got.flags.f_contiguous) == (want.flags.c_contiguous, want.flags.f_contiguous)
    else:  # pickle copies a non-contiguous array into C order
        assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", PLAIN_ARRAYS)
def test_plain_arrays_take_the_c_pickler_and_make_cloudpickles_bytes(name, cloudpickled):
    array = PLAIN_ARRAYS[name]()
    job = (workerfns.add, (array, 2, "s"))
    expected = {
        "job": codec._out_of_band(cloudpickled.real, job),
        "value": codec._out_of_band(cloudpickled.real, array),
    }
    got = {"job": codec.dumps_job(*job), "value": codec.dumps_value(array)}
    assert cloudpickled.calls == []  # the fast path, both ways
    for kind in ("job", "value"):
        data, buffers = got[kind]
        assert data == expected[kind][0]
        assert [bytes(b) for b in buffers] == [bytes(b) for b in expected[kind][1]]
        if name in ("C", "F", "structured", "unicode"):
            # Out of band, and the array's own memory: not copied. (numpy
            # pickles datetimes in band: they export no buffer.)
            assert len(buffers) == 1 and np.shares_memory(np.frombuffer(buffers[0], np.uint8), array)
        loaded = pickle.loads(data, buffers=buffers)
        if kind == "job":
            fn, loaded = loaded
            assert fn is workerfns.add and loaded[1:] == (2, "s")
            loaded = loaded[0]
        assert_same_array(loaded, array)


def _local_class():
    class Unit:  # defined in a function: pickle cannot name it, cloudpickle sends it by value
        pass

    return Unit


class Tagged(np.ndarray):
    """An ndarray subclass: its reduce is its own business, so cloudpickle's."""


def _local_subclass_array():
    class LocalArray(np.ndarray):
        pass

    return np.arange(2**15, dtype=np.float64).view(LocalArray)


# Arrays the C pickler must not take: Python objects inside, a subclass, or a
# dtype carrying Python objects (metadata, field titles).
NOT_PLAIN = {
    "object": lambda: np.array([1, "a", None, {"k": 2}], dtype=object),
    "masked": lambda: np.ma.masked_array(np.arange(2**15, dtype=np.float64), mask=np.arange(2**15) % 3 == 0),
    "subclass": lambda: np.arange(2**15, dtype=np.float64).view(Tagged),
    "local subclass": _local_subclass_array,
    "metadata": lambda: np.arange(2**15, dtype=np.dtype(np.float64, metadata={"unit": "m"})),
    "metadata class": lambda: np.zeros(3, dtype=np.dtype(np.float64, metadata={"unit": _local_class()})),
    "field metadata": lambda: np.zeros(3, dtype=[("a", np.dtype(np.int32, metadata={"unit": "s"}))]),
    "subarray metadata": lambda: np.zeros(3, dtype=[("v", np.dtype(np.float32, metadata={"unit": "s"}), (3,))]),
    "title class": lambda: np.zeros(3, dtype=np.dtype({"names": ["a"], "formats": ["f8"], "titles": [_local_class()]})),
}
if hasattr(np.dtypes, "StringDType"):  # numpy 2: variable-width strings, held as Python objects
    NOT_PLAIN["StringDType"] = lambda: np.array(["a", "bcd"], dtype=np.dtypes.StringDType())


def dtype_metadata(dtype):
    """Every metadata dict and field title in ``dtype``, as comparable names."""
    found = [dtype.metadata and {k: getattr(v, "__name__", v) for k, v in dtype.metadata.items()}]
    for field in (dtype.fields or {}).values():
        found.append(getattr(field[-1], "__name__", field[-1]))
        found += dtype_metadata(field[0])
    if dtype.subdtype is not None:
        found += dtype_metadata(dtype.subdtype[0])
    return found


@pytest.mark.parametrize("make", NOT_PLAIN.values(), ids=NOT_PLAIN.keys())
def test_other_arrays_go_through_cloudpickle_and_come_back_the_same(make, cloudpickled):
    array = make()
    assert not codec._plain_array(array)
    for kind in ("job", "value"):
        if kind == "job":
            data, buffers = codec.dumps_job(workerfns.add, (array,))
            assert cloudpickled.calls == [(workerfns.add, (array,))]
            loaded = pickle.loads(data, buffers=buffers)[1][0]
        else:
            data, buffers = codec.dumps_value(array)
            assert len(cloudpickled.calls) == 2 and cloudpickled.calls[1] is array
            loaded = pickle.loads(data, buffers=buffers)
        assert type(loaded).__name__ == type(array).__name__ and isinstance(loaded, np.ndarray)
        assert loaded.dtype.kind == array.dtype.kind and loaded.shape == array.shape
        assert dtype_metadata(loaded.dtype) == dtype_metadata(array.dtype)
        assert repr(loaded.tolist()) == repr(array.tolist())
        if isinstance(array, np.ma.MaskedArray):
            np.testing.assert_array_equal(loaded.mask, array.mask)


def test_an_object_array_holding_a_local_function_goes_by_value(cloudpickled):
    offset = 10
    array = np.array([lambda x: x + offset, 3], dtype=object)
    data, buffers = codec.dumps_value(array)
    assert len(cloudpickled.calls) == 1
    fn, three = pickle.loads(data, buffers=buffers)
    assert fn(1) == 11 and three == 3


def test_arrays_for_a_function_from_main_go_with_it_by_value(cloudpickled):
    main_fn = types.FunctionType((lambda array, factor: array * factor).__code__, {}, "scaled")
    main_fn.__module__ = "__main__"
    main_fn.__qualname__ = "scaled"
    array = np.arange(2**17, dtype=np.float64)  # 1 MiB: still out of band
    data, buffers = codec.dumps_job(main_fn, (array, 3))
    assert len(cloudpickled.calls) == 1 and len(buffers) == 1
    fn, args = pickle.loads(data, buffers=buffers)
    assert fn is not main_fn and fn.__name__ == "scaled"
    np.testing.assert_array_equal(fn(*args), array * 3)


def test_arrays_in_containers_or_beside_other_objects_go_through_cloudpickle(cloudpickled):
    array = np.arange(2**17, dtype=np.float64)
    for args in [([array],), (array, [1]), (array, {"k": 1}), ({"a": array},)]:
        before = len(cloudpickled.calls)
        data, buffers = codec.dumps_job(workerfns.add, args)
        assert len(cloudpickled.calls) == before + 1
        assert len(buffers) == 1  # out of band all the same
        assert repr(pickle.loads(data, buffers=buffers)[1]) == repr(args)


def test_a_function_its_module_no_longer_names_falls_back_to_cloudpickle_with_its_arrays(cloudpickled):
    gone = types.FunctionType(workerfns.add.__code__, {}, "gone")
    gone.__module__ = workerfns.__name__
    gone.__qualname__ = "gone"  # workerfns has no attribute "gone": pickle raises
    assert codec._importable_function(gone)
    first, second = np.arange(2**17, dtype=np.float64), np.ones(2**17)
    data, buffers = codec.dumps_job(gone, (first, second))
    assert len(cloudpickled.calls) == 1
    # Only cloudpickle's buffers: the failed attempt left none behind.
    assert len(buffers) == 2
    assert np.shares_memory(np.frombuffer(buffers[0], np.uint8), first)
    assert np.shares_memory(np.frombuffer(buffers[1], np.uint8), second)
    fn, args = pickle.loads(data, buffers=buffers)
    np.testing.assert_array_equal(fn(*args), first + 1)


def test_the_module_never_imports_numpy():
    code = textwrap.dedent(
        """
        import sys
        from _trio_parallel_fs_worker import codec
        codec.dumps_job(len, ("abc",))
        codec.dumps_job(len, ([1, 2], bytearray(1 << 17)))
        codec.dumps_value([1, 2])
        codec.dumps_value(bytearray(1 << 17))
        print("numpy" in sys.modules)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "False", done.stderr


async def test_plain_arrays_through_real_workers_both_ways(worker_type, cloudpickled):
    # np.asarray returns its argument: an identity job whose function pickle
    # can name, so the parent takes the fast path; the worker's result is a
    # plain array, so does the worker.
    arrays = [PLAIN_ARRAYS[name]() for name in ("C", "F", "strided", "structured", "zero-size", "small")]
    arrays.append(np.arange(2**19, dtype=np.float64))  # 4 MiB: through the shared memory area where there is one
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        for array in arrays:
            with trio.fail_after(60):
                result = await ctx.run_sync(np.asarray, array)
            assert_same_array(result, array)
            assert not np.shares_memory(result, array)
    assert cloudpickled.calls == []


PLAIN_RESULTS = {
    "float64": lambda: np.float64(1.5),
    "int32": lambda: np.int32(-4),
    "datetime": lambda: np.datetime64("2020-01-01"),
    "record": lambda: np.zeros(1, dtype=[("a", "i4"), ("b", "f8")])[0],
    "mean, std": lambda: (np.float64(2.0), np.float64(0.5)),
    "arrays in a list": lambda: [np.arange(2**17, dtype=np.float64), np.ones(3)],  # one out of band
    "two deep": lambda: (1, "s", [np.int8(3), None, np.arange(4)]),
}


@pytest.mark.parametrize("make", PLAIN_RESULTS.values(), ids=PLAIN_RESULTS.keys())
def test_results_of_atoms_arrays_and_numpy_scalars_take_the_c_pickler_and_make_cloudpickles_bytes(make, cloudpickled):
    value = make()
    want_data, want_buffers = codec._out_of_band(cloudpickled.real, value)
    data, buffers = codec.dumps_value(value)
    assert cloudpickled.calls == []
    assert data == want_data
    assert [bytes(b) for b in buffers] == [bytes(b) for b in want_buffers]
    assert repr(pickle.loads(data, buffers=buffers)) == repr(value)


class LocalFloat(np.float64):
    pass


NOT_PLAIN_RESULTS = {
    "a function inside": lambda: (1, lambda: 2),
    "a numpy scalar subclass": lambda: (LocalFloat(1.0),),
    "three deep": lambda: (((np.float64(1),),),),
    "65 items": lambda: tuple(range(65)),
    "a dict": lambda: {"mean": np.float64(1)},
    "an object array": lambda: [np.array([1, "a"], dtype=object)],
}


@pytest.mark.parametrize("make", NOT_PLAIN_RESULTS.values(), ids=NOT_PLAIN_RESULTS.keys())
def test_other_results_go_through_cloudpickle(make, cloudpickled):
    value = make()
    data, buffers = codec.dumps_value(value)
    assert cloudpickled.calls == [value]
    assert type(pickle.loads(data, buffers=buffers)) is type(value)


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"not a pickle", "UnpicklingError"),
        (pickle.dumps((None, "not a list", "text")), "TypeError: a str text and a str chain"),
        (pickle.dumps((None, [], 42)), "TypeError: a int text and a list chain"),
        (pickle.dumps((1, 2)), "ValueError"),
    ],
)
def test_an_error_payload_that_encode_error_did_not_make_is_reported_not_raised(payload, why):
    """Checked where it is used: the pool decodes whatever a worker sent."""
    from _trio_parallel_fs_worker.codec import decode_error

    error = decode_error(payload)
    assert type(error) is RuntimeError
    assert str(error).startswith(f"the worker sent an error that could not be read ({why}")


def test_a_malformed_link_of_an_error_chain_ends_the_chain():
    from _trio_parallel_fs_worker.codec import decode_error

    error = decode_error(pickle.dumps((pickle.dumps(ValueError("outer")), ["not a pair"], "Traceback ...\n")))
    assert type(error) is ValueError and str(error) == "outer"
    assert error.__cause__ is not None and type(error.__cause__).__name__ == "RemoteTraceback"
