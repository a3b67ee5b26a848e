"""The choice between pickle and cloudpickle, in memory."""

from __future__ import annotations

import pickle
import types

import cloudpickle
import workerfns

from _trio_parallel_fs_worker import _pickling


def test_importable_function_with_atomic_args_uses_plain_pickle():
    args = (1, 2.5, "s", b"b", None, True, 1j)
    data = _pickling.dumps_job(workerfns.add, args)
    assert data == pickle.dumps((workerfns.add, args), _pickling.PROTOCOL)
    assert pickle.loads(data) == (workerfns.add, args)


def test_lambdas_closures_and_containers_go_through_cloudpickle():
    offset = 3
    for fn, args in [(lambda x: x + 1, (1,)), (lambda x: x + offset, (1,)), (workerfns.add, ([1], [2]))]:
        data = _pickling.dumps_job(fn, args)
        assert data == cloudpickle.dumps((fn, args), _pickling.PROTOCOL)
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
    assert _pickling.dumps_value(5) == pickle.dumps(5, _pickling.PROTOCOL)
    lam = lambda: 1  # noqa: E731
    assert pickle.loads(_pickling.dumps_value(lam))() == 1
