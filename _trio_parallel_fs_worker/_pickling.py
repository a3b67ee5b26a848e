"""Pickling for the wire: the C pickler when it is certainly enough, else cloudpickle.

cloudpickle is needed for functions defined in ``__main__``, lambdas, closures
and anything they reference. For the common warm call (an importable function,
a few numbers or strings) it costs several times what ``pickle`` does, for the
same bytes. So the choice is made *before* pickling, from the types alone,
never by trying one and then the other: a large argument is pickled once.
"""

from __future__ import annotations

import io
import pickle
import types
from collections import ChainMap
from typing import Any

import cloudpickle

PROTOCOL = pickle.HIGHEST_PROTOCOL

# Buffers from this size on travel beside the pickle instead of inside it.
OUT_OF_BAND_MIN = 1 << 16

Pickled = tuple[bytes, list[memoryview]]

# Objects of these exact types pickle the same way with both picklers.
_ATOMIC = frozenset({int, float, complex, str, bytes, bool, type(None)})


# Modules the user registered with cloudpickle.register_pickle_by_value: their
# functions must go by value, which plain pickle would not do. Looked up once:
# cloudpickle mutates this set in place, and dumps_job runs on every call.
_BY_VALUE_MODULES: Any = getattr(getattr(cloudpickle, "cloudpickle", None), "_PICKLE_BY_VALUE_MODULES", ())


def _importable_function(fn: object) -> bool:
    """True if pickle would store ``fn`` by reference exactly as cloudpickle does."""
    if type(fn) not in (types.FunctionType, types.BuiltinFunctionType):
        return False
    module = getattr(fn, "__module__", None)
    return (
        module is not None
        and module != "__main__"
        and "<" not in getattr(fn, "__qualname__", "<")  # lambdas and nested functions
        and not (_BY_VALUE_MODULES and _registered_by_value(module))
    )


def _registered_by_value(module: str) -> bool:
    """True if ``module`` or a package above it was registered with
    ``cloudpickle.register_pickle_by_value`` (as cloudpickle itself decides)."""
    parts = module.split(".")
    return any(".".join(parts[:depth]) in _BY_VALUE_MODULES for depth in range(1, len(parts) + 1))


# cloudpickle 3.1 names the file of every function it pickles by value
# "<dynamic-code>", so a remote traceback through a function defined in
# __main__ would not show where it is. Keep the real file name: workers run on
# this machine, and the traceback then shows the source lines too.
_code_reduce = getattr(getattr(cloudpickle, "cloudpickle", None), "_code_reduce", None)


def _code_reduce_keeping_file(code: types.CodeType) -> Any:
    assert _code_reduce is not None
    constructor, args = _code_reduce(code)
    args = tuple(code.co_filename if arg == "<dynamic-code>" else arg for arg in args)
    return constructor, args


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    if _code_reduce is not None:
        dispatch_table = ChainMap({types.CodeType: _code_reduce_keeping_file}, cloudpickle.Pickler.dispatch_table)


def _cloudpickle_dumps(obj: object, buffer_callback: Any = None) -> bytes:
    with io.BytesIO() as file:
        _Pickler(file, protocol=PROTOCOL, buffer_callback=buffer_callback).dump(obj)
        return file.getvalue()


def _cloudpickle_out_of_band(obj: object) -> Pickled:
    """Pickle ``obj``, leaving its large contiguous buffers (numpy arrays,
    bytearrays...) out of the pickle: they are sent as they are, not copied."""
    buffers: list[memoryview] = []

    def keep_out(buffer: pickle.PickleBuffer) -> bool:
        try:
            view = buffer.raw()
        except BufferError:  # not contiguous: let the pickle copy it
            return True
        if view.nbytes < OUT_OF_BAND_MIN:
            return True
        buffers.append(view)
        return False

    return _cloudpickle_dumps(obj, keep_out), buffers


def loads(payload: bytes | bytearray | memoryview, buffers: list[memoryview] | None = None) -> Any:
    return pickle.loads(payload, buffers=buffers)


def dumps_job(fn: object, args: tuple[Any, ...]) -> Pickled:
    if _importable_function(fn) and all(type(arg) in _ATOMIC for arg in args):
        try:
            return pickle.dumps((fn, args), PROTOCOL), []
        except pickle.PicklingError:
            # Its module no longer names it (reloaded, monkeypatched): cloudpickle
            # sends it by value. The arguments are small atoms, so trying twice
            # costs nothing worth saving.
            pass
    return _cloudpickle_out_of_band((fn, args))


def dumps_value(value: object) -> Pickled:
    if type(value) in _ATOMIC:
        return pickle.dumps(value, PROTOCOL), []
    return _cloudpickle_out_of_band(value)
