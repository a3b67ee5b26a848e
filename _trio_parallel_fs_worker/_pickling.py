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

# Objects of these exact types pickle the same way with both picklers.
_ATOMIC = frozenset({int, float, complex, str, bytes, bool, type(None)})


def _by_value_modules() -> Any:
    # Modules the user registered with cloudpickle.register_pickle_by_value:
    # their functions must go by value, which plain pickle would not do.
    return getattr(getattr(cloudpickle, "cloudpickle", None), "_PICKLE_BY_VALUE_MODULES", ())


def _importable_function(fn: object) -> bool:
    """True if pickle would store ``fn`` by reference exactly as cloudpickle does."""
    if type(fn) not in (types.FunctionType, types.BuiltinFunctionType):
        return False
    module = getattr(fn, "__module__", None)
    return (
        module is not None
        and module != "__main__"
        and "<" not in getattr(fn, "__qualname__", "<")  # lambdas and nested functions
        and not _by_value_modules()
    )


def dumps_job(fn: object, args: tuple[Any, ...]) -> bytes:
    if _importable_function(fn) and all(type(arg) in _ATOMIC for arg in args):
        try:
            return pickle.dumps((fn, args), PROTOCOL)
        except pickle.PicklingError:
            # Its module no longer names it (reloaded, monkeypatched): cloudpickle
            # sends it by value. The arguments are small atoms, so trying twice
            # costs nothing worth saving.
            pass
    data: bytes = cloudpickle.dumps((fn, args), PROTOCOL)
    return data


def dumps_value(value: object) -> bytes:
    if type(value) in _ATOMIC:
        return pickle.dumps(value, PROTOCOL)
    data: bytes = cloudpickle.dumps(value, PROTOCOL)
    return data
