"""A job's exception on the wire: encoded in the worker with its chain and
traceback, decoded in the parent into the same exception, whatever it holds.

Pure functions over bytes; both ends import this module.

An exception travels as ``(pickled exception, [(how, pickled link)...],
traceback text)``. pickle keeps neither ``__cause__`` nor ``__context__``, so
each link of the chain is pickled on its own. Anything that cannot make the
trip (an unpicklable attribute, an ``__init__`` that does not accept its args,
a ``__str__`` that raises, a class only the worker has, an unpickling that
raises SystemExit) becomes a `RuntimeError` stand-in that says so and keeps
the traceback text.
"""

from __future__ import annotations

import pickle
import traceback

import cloudpickle

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
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
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
    exc_data, chain, text = pickle.loads(payload)
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
    for how, data in chain:
        try:
            inner = _load(data)
        except _Unloadable:  # the traceback text still shows it
            break
        if how == "cause":
            link.__cause__ = inner
        else:
            link.__context__ = inner
        link = inner
    link.__cause__ = RemoteTraceback(text)
    return exc
