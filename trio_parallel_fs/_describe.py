"""How a job's function is named in messages."""

from __future__ import annotations

import functools


def describe(fn: object) -> str:
    """``module.qualname`` of a job's function, for messages."""
    inner = fn.func if isinstance(fn, functools.partial) else fn
    module = getattr(inner, "__module__", None)
    name = getattr(inner, "__qualname__", None) or repr(inner)
    return f"{module}.{name}" if module and module != "builtins" else name
