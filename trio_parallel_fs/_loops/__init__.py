"""Which event loop library runs this call, and its few primitives.

Theory of operation: the library waits on sockets and fds, sleeps, shields
a call from cancellation, bounds a wait by a deadline, runs a blocking start
in a thread and makes a per-run limiter: a dozen primitives, the names
`trio_loop` defines. `trio_loop` gives them under Trio (Trio's own calls:
the warm path is unchanged); `asyncio_loop` under asyncio (and so under
anyio's asyncio backend and uvloop). `current` picks one, on every use,
from the thread-local that Trio sets while ``trio.run`` runs in this thread
(sniffio's, read as one attribute: Trio's warm path pays nothing more), and
otherwise from sniffio's full detection. Nothing else in the library knows
which loop runs.

Neither module is imported before it is needed, so that an asyncio program
never imports Trio on our account.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any, TypeVar

import sniffio
from sniffio import thread_local as _sniffio_local

T = TypeVar("T")

_trio: ModuleType | None = None
_asyncio: ModuleType | None = None

NOT_IN_A_LOOP = (
    "trio_parallel_fs must be used inside trio.run or a running asyncio event loop "
    "(asyncio.run, anyio.run); found {found}"
)


F = TypeVar("F", bound=Callable[..., Any])

#: Functions to protect from KeyboardInterrupt under Trio, once Trio is loaded.
_ki_protect_later: list[Callable[..., Any]] = []


def says_gone(gone: Callable[[], bool]) -> bool:
    """``gone()`` as a watch asks it for a waiting task (``wait_readable_or_gone``):
    True if it raises, so that the task wakes and meets the error itself (in
    the watch, a system task or a loop callback, it would end the run or be
    lost)."""
    try:
        return gone()
    except Exception:  # noqa: BLE001 - surfaced by the waiter, which asks again
        return True


def ki_protected(fn: F) -> F:
    """``trio.lowlevel.enable_ki_protection``, without importing Trio: at once
    if Trio is imported already (any Trio version), else when a call first
    runs under Trio (Trio 0.28 and later register the function's code object,
    which works after the fact). Under asyncio it means nothing: Ctrl-C
    cancels the main task there."""
    if "trio" in sys.modules:
        import trio

        return trio.lowlevel.enable_ki_protection(fn)
    _ki_protect_later.append(fn)
    return fn


def _load_trio() -> ModuleType:
    global _trio
    from . import trio_loop

    for fn in _ki_protect_later:
        trio_loop.enable_ki_protection(fn)
    _ki_protect_later.clear()
    _trio = trio_loop
    return trio_loop


def _load_asyncio() -> ModuleType:
    global _asyncio
    from . import asyncio_loop

    _asyncio = asyncio_loop
    return asyncio_loop


def current() -> Any:
    """The primitives of the event loop library running this task (a module
    of `trio_loop`'s names). Raises RuntimeError outside Trio and asyncio."""
    if _sniffio_local.name == "trio":
        return _trio if _trio is not None else _load_trio()
    # What sniffio.current_async_library() does next, without its import
    # statement and asyncio.current_task(): a microsecond per call together.
    library = sniffio.current_async_library_cvar.get()  # Trio's guest mode sets it
    if library is None:
        asyncio = sys.modules.get("asyncio")
        if asyncio is not None and asyncio._get_running_loop() is not None:
            library = "asyncio"
    if library == "asyncio":
        return _asyncio if _asyncio is not None else _load_asyncio()
    if library == "trio":
        return _trio if _trio is not None else _load_trio()
    found = "no running event loop in this thread" if library is None else library
    raise RuntimeError(NOT_IN_A_LOOP.format(found=found))


# The primitives, for code that needs one or two of them once per call: each
# looks up the loop. A path that uses several takes ``current()`` once.


def checkpoint() -> Awaitable[None]:
    return current().checkpoint()  # type: ignore[no-any-return]


def wait_readable(fd: Any) -> Awaitable[None]:
    return current().wait_readable(fd)  # type: ignore[no-any-return]


def wait_writable(fd: Any) -> Awaitable[None]:
    return current().wait_writable(fd)  # type: ignore[no-any-return]


def sleep(seconds: float) -> Awaitable[None]:
    return current().sleep(seconds)  # type: ignore[no-any-return]


def move_on_after(seconds: float) -> Any:
    return current().move_on_after(seconds)


def CancelScope(*, shield: bool) -> Any:  # noqa: N802 - stands where trio.CancelScope stood
    return current().CancelScope(shield=shield)


def to_thread_run_sync(fn: Callable[[], T], *, abandon_on_cancel: bool = False) -> Awaitable[T]:
    return current().to_thread_run_sync(fn, abandon_on_cancel=abandon_on_cancel)  # type: ignore[no-any-return]


def spawn_system_task(async_fn: Callable[[], Awaitable[None]], *, name: str) -> None:
    current().spawn_system_task(async_fn, name=name)


def closed_resource_error(message: str) -> Exception:
    """trio.ClosedResourceError under Trio, anyio's under asyncio."""
    return current().ClosedResourceError(message)  # type: ignore[no-any-return]
