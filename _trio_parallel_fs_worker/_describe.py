"""How a job's function is named in messages, on both ends."""

from __future__ import annotations

import functools


def describe(fn: object) -> str:
    """``module.qualname`` of a job's function (of the function a
    ``functools.partial`` wraps), for messages."""
    inner = fn.func if isinstance(fn, functools.partial) else fn
    module = getattr(inner, "__module__", None)
    name = getattr(inner, "__qualname__", None) or repr(inner)
    return f"{module}.{name}" if module and module != "builtins" else name
