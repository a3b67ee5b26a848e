"""Pickling for the wire: the C pickler when it is certainly enough, else cloudpickle.

cloudpickle is needed for functions defined in ``__main__``, lambdas, closures
and anything they reference. For the common warm call (an importable function,
a few numbers or strings) it costs several times what ``pickle`` does, for the
same bytes. So the choice is made *before* pickling, from the types alone,
never by trying one and then the other: a large argument is pickled once.
"""

from __future__ import annotations

import pickle
import types
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
        and not _BY_VALUE_MODULES
    )


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

    data: bytes = cloudpickle.dumps(obj, PROTOCOL, buffer_callback=keep_out)
    return data, buffers


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
