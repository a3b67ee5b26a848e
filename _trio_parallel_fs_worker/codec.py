"""The codec: what a job, its result and its exception become on the wire, and back.

Each encode stands next to its decode, so that a change to one side shows
the other: jobs (`dumps_job`, `loads_job`), results (`dumps_value`,
`loads_value`), exceptions with their chains (`encode_error`,
`decode_error`). Both ends import this module; the parent decodes results and
errors through it. Pure functions over bytes and buffers: framing is the
protocol's (``protocol``), where buffers travel is the channel's.

Pickling: the C pickler when it is certainly enough, else cloudpickle.
cloudpickle is needed for functions defined in ``__main__``, lambdas, closures
and anything they reference. For the common warm call (an importable function,
a few numbers or strings, or plain numpy arrays) it costs several times what
``pickle`` does, for the same bytes: its pickler runs Python code for every
object (a job with a 1 MiB array: ~30 us against ~8 us, warm). So the choice
is made *before* pickling, from the types alone, never by trying one and then
the other: a large argument is pickled once. (The one retry, when a function's
module no longer names it, fails on the function, which is pickled first.)
Decoding is always the C unpickler: it loads what either pickler wrote.

numpy is never imported here: a process that holds an array has imported it,
so ``sys.modules`` is where it is looked up.

Exceptions: an exception travels as ``(pickled exception, [(how, pickled
link)...], traceback text)``. pickle keeps neither ``__cause__`` nor
``__context__``, so each link of the chain is pickled on its own. Anything
that cannot make the trip (an unpicklable attribute, an ``__init__`` that does
not accept its args, a ``__str__`` that raises, a class only the worker has,
an unpickling that raises SystemExit) becomes a `RuntimeError` stand-in that
says so and keeps the traceback text.
"""

from __future__ import annotations

import io
import pickle
import sys
import traceback
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


def _pickle_dumps(obj: object, buffer_callback: Any = None) -> bytes:
    return pickle.dumps(obj, PROTOCOL, buffer_callback=buffer_callback)


def _plain_array(obj: object) -> bool:
    """True if ``obj`` is a numpy array that the C pickler stores exactly as
    cloudpickle does: an ``ndarray`` itself (a subclass may reduce to anything)
    whose dtype holds nothing but numpy's own types (see ``_plain_dtype``)."""
    numpy = sys.modules.get("numpy")
    return numpy is not None and type(obj) is numpy.ndarray and _plain_dtype(obj.dtype)  # type: ignore[attr-defined]


def _plain_scalar(obj: object) -> bool:
    """True if ``obj`` is a numpy scalar (``arr.mean()`` gives one) of a plain
    dtype: it reduces to numpy's own ``scalar(dtype, bytes)``."""
    numpy = sys.modules.get("numpy")
    return (
        numpy is not None
        and isinstance(obj, numpy.generic)
        and type(obj).__module__ == "numpy"
        and _plain_dtype(obj.dtype)
    )


# How far _plain_result looks into tuples and lists: results like
# ``(mean, std)`` or ``[array, array]``, not arbitrary data (checking costs too).
_RESULT_DEPTH, _RESULT_ITEMS = 2, 64


def _plain_result(obj: object, depth: int = 0) -> bool:
    """True if the C pickler stores ``obj`` exactly as cloudpickle does: an
    atom, a plain array or numpy scalar, or a tuple or list of such (nested
    ``_RESULT_DEPTH`` deep, ``_RESULT_ITEMS`` items each at most)."""
    kind = type(obj)
    if kind in _ATOMIC:
        return True
    if kind is tuple or kind is list:
        return (
            depth < _RESULT_DEPTH
            and len(obj) <= _RESULT_ITEMS  # type: ignore[arg-type]
            and all(_plain_result(item, depth + 1) for item in obj)  # type: ignore[attr-defined]
        )
    return _plain_array(obj) or _plain_scalar(obj)


def _plain_dtype(dtype: Any) -> bool:
    """True if pickling ``dtype`` references nothing but numpy.

    Python objects can hide in a dtype in three places, and pickle would store
    a class or function among them by reference even where cloudpickle sends
    it by value (from ``__main__``, say), which a worker could not load: the
    elements (``dtype=object``, ``StringDType``: ``hasobject``), ``metadata``
    (any dict), and the titles of a structured dtype's fields (any object).
    """
    if dtype.hasobject or dtype.metadata is not None:
        return False
    fields = dtype.fields
    if fields is not None:
        # Each field is (dtype, offset) or (dtype, offset, title).
        return all(_plain_dtype(field[0]) and type(field[-1]) in _ATOMIC for field in fields.values())
    subarray = dtype.subdtype  # (base dtype, shape) for a dtype like ("f8", (3,))
    return subarray is None or _plain_dtype(subarray[0])


def _out_of_band(dumps: Any, obj: object) -> Pickled:
    """Pickle ``obj`` with ``dumps`` (``_pickle_dumps`` or ``_cloudpickle_dumps``),
    leaving its large contiguous buffers (numpy arrays, bytearrays...) out of
    the pickle: they are sent as they are, not copied."""
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

    return dumps(obj, keep_out), buffers


def dumps_job(fn: object, args: tuple[Any, ...]) -> Pickled:
    if _importable_function(fn):
        # If its module no longer names it (reloaded, monkeypatched), pickle
        # raises and cloudpickle sends it by value. The function is pickled
        # before the arguments, so trying twice costs nothing worth saving.
        if all(type(arg) in _ATOMIC for arg in args):
            try:
                return pickle.dumps((fn, args), PROTOCOL), []
            except pickle.PicklingError:
                pass
        elif all(type(arg) in _ATOMIC or _plain_array(arg) for arg in args):
            try:
                return _out_of_band(_pickle_dumps, (fn, args))
            except pickle.PicklingError:
                pass
    return _out_of_band(_cloudpickle_dumps, (fn, args))


def loads_job(pickled: bytes | bytearray | memoryview, buffers: list[memoryview]) -> Any:
    """The ``(fn, args)`` of `dumps_job`: the buffers are used as they are, no copy."""
    return pickle.loads(pickled, buffers=buffers)


def dumps_value(value: object) -> Pickled:
    if type(value) in _ATOMIC:
        return pickle.dumps(value, PROTOCOL), []
    if _plain_result(value):
        # No fallback: plain arrays and scalars reference only numpy, which
        # both picklers store by reference, so if pickle fails cloudpickle would too.
        return _out_of_band(_pickle_dumps, value)
    return _out_of_band(_cloudpickle_dumps, value)


def loads_value(pickled: bytes | bytearray | memoryview, buffers: list[memoryview]) -> Any:
    """The result of `dumps_value`, rebuilt on its buffers (no copy)."""
    return pickle.loads(pickled, buffers=buffers)


# --- exceptions ---------------------------------------------------------------

_MAX_CHAIN = 10


class RemoteTraceback(Exception):
    """Carries the traceback text of an exception raised in a worker.

    Set as the ``__cause__`` of the innermost exception of the chain a job
    raised, so that the worker's frames show up first when the exception is
    printed in the parent.

    Attributes:
        text: The traceback, formatted in the worker.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n\n" + self.text.rstrip("\n")


def _round_trip(obj: object) -> bytes:
    """Pickle ``obj`` and load it back once: an exception whose ``__init__`` takes
    other arguments than ``args`` pickles fine but fails to load, and the parent
    must never be the one to find that out."""
    data: bytes = cloudpickle.dumps(obj)
    pickle.loads(data)
    return data


def _chain(exc: BaseException) -> list[tuple[str, bytes]]:
    """The exceptions ``exc`` was raised from or during, each pickled on its own.
    The chain stops at the first link that cannot travel."""
    links: list[tuple[str, bytes]] = []
    seen = {id(exc)}
    current = exc
    while len(links) < _MAX_CHAIN:
        if current.__cause__ is not None:
            how, nxt = "cause", current.__cause__
        elif current.__context__ is not None and not current.__suppress_context__:
            how, nxt = "context", current.__context__
        else:
            break
        if id(nxt) in seen:
            break
        seen.add(id(nxt))
        try:
            links.append((how, _round_trip(nxt)))
        except BaseException:  # noqa: BLE001 - the traceback text still shows it
            break
        current = nxt
    return links


def safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:  # noqa: BLE001 - a broken __str__ must not kill the worker
        return f"<{type(exc).__name__} whose str() failed>"


def encode_error(exc: BaseException) -> bytes:
    """Pickle an exception, its chain and its formatted traceback, whatever they hold."""
    try:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException as why:  # noqa: BLE001 - e.g. an attribute that raises when read
        # Without its text the exception itself may still travel; its frames at least do.
        frames = "".join(traceback.format_tb(exc.__traceback__))
        text = (
            f"Traceback (most recent call last):\n{frames}{type(exc).__module__}.{type(exc).__qualname__}: "
            f"{safe_str(exc)} (its full traceback could not be formatted: {type(why).__name__}: {safe_str(why)})\n"
        )
    try:
        return pickle.dumps((_round_trip(exc), _chain(exc), text))
    except BaseException as why:  # noqa: BLE001 - anything the pickle machinery raises
        stand_in = RuntimeError(
            f"the job raised {type(exc).__module__}.{type(exc).__qualname__}: {safe_str(exc)}, "
            f"which could not travel back from the worker ({type(why).__name__}: {safe_str(why)}); "
            "its traceback follows. Give the exception picklable attributes and an "
            "__init__ that accepts its args, or raise a simpler one."
        )
        return pickle.dumps((pickle.dumps(stand_in), [], text))


def _load(data: bytes) -> BaseException:
    """Unpickle one link; anything but KeyboardInterrupt that unpickling raises
    (SystemExit included) is the link's failure, not the caller's."""
    try:
        exc = pickle.loads(data)
    except KeyboardInterrupt:
        raise
    except BaseException as why:  # noqa: BLE001 - e.g. its class only exists in the worker
        raise _Unloadable(why) from None
    if not isinstance(exc, BaseException):
        raise _Unloadable(TypeError(f"expected an exception, got {type(exc).__name__}"))
    return exc


class _Unloadable(Exception):
    def __init__(self, why: BaseException) -> None:
        super().__init__(why)
        self.why = why


def decode_error(payload: bytes) -> BaseException:
    """Rebuild an exception sent by a worker with its chain; the remote traceback
    becomes the cause of the innermost link, so printing shows it first."""
    try:
        exc_data, chain, text = pickle.loads(payload)
        if not isinstance(text, str) or not isinstance(chain, list):
            raise TypeError(f"a {type(text).__name__} text and a {type(chain).__name__} chain")
    except KeyboardInterrupt:
        raise
    except BaseException as unreadable:  # noqa: BLE001 - not what encode_error makes: say so, in the caller's task
        return RuntimeError(
            f"the worker sent an error that could not be read ({type(unreadable).__name__}: {safe_str(unreadable)})"
        )
    try:
        exc = _load(exc_data)
    except _Unloadable as unloadable:
        why = unloadable.why
        first_line = text.rstrip("\n").rsplit("\n", 1)[-1]
        exc = RuntimeError(
            f"the job raised {first_line}, which could not be unpickled in the parent "
            f"({type(why).__name__}: {safe_str(why)}); its traceback follows"
        )
        chain = []
    link = exc
    for item in chain:
        try:
            how, data = item
            inner = _load(data)
        except (_Unloadable, TypeError, ValueError):  # the traceback text still shows it
            break
        if how == "cause":
            link.__cause__ = inner
        else:
            link.__context__ = inner
        link = inner
    link.__cause__ = RemoteTraceback(text)
    return exc
