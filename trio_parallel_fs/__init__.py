"""trio_parallel_fs: run CPU-bound sync functions from Trio in worker processes
forked from a preloaded template.

A drop-in for trio-parallel: the same names and keywords, plus ``preload``,
recycling by job count and memory, and a memory ceiling.

The public names load on first use (PEP 562), so that ``import
trio_parallel_fs`` (which pytest does for the plugin in every session, through
its entry point) costs nothing until the library is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Each public name, and the private module it lives in.
_EXPORTS = {
    "BrokenWorkerError": "._errors",
    "MemoryCeilingError": "._errors",
    "RemoteTraceback": "._errors",
    "TemplateStartError": "._errors",
    "WorkerHookError": "._errors",
    "WorkerConfig": "._config",
    "WorkerType": "._config",
    "WorkerContext": "._frontend",
    "cache_scope": "._frontend",
    "configure_default_context": "._frontend",
    "current_default_process_limiter": "._frontend",
    "current_default_worker_limiter": "._frontend",
    "default_context_statistics": "._frontend",
    "imap": "._frontend",
    "map": "._frontend",
    "open_worker_context": "._frontend",
    "run_sync": "._frontend",
    "WorkerContextStatistics": "._pool.pool",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from ._config import WorkerConfig as WorkerConfig
    from ._config import WorkerType as WorkerType
    from ._errors import BrokenWorkerError as BrokenWorkerError
    from ._errors import MemoryCeilingError as MemoryCeilingError
    from ._errors import RemoteTraceback as RemoteTraceback
    from ._errors import TemplateStartError as TemplateStartError
    from ._errors import WorkerHookError as WorkerHookError
    from ._frontend import WorkerContext as WorkerContext
    from ._frontend import cache_scope as cache_scope
    from ._frontend import configure_default_context as configure_default_context
    from ._frontend import current_default_process_limiter as current_default_process_limiter
    from ._frontend import current_default_worker_limiter as current_default_worker_limiter
    from ._frontend import default_context_statistics as default_context_statistics
    from ._frontend import imap as imap
    from ._frontend import map as map
    from ._frontend import open_worker_context as open_worker_context
    from ._frontend import run_sync as run_sync
    from ._pool.pool import WorkerContextStatistics as WorkerContextStatistics


def _load_all() -> None:
    """Import every public name at once, the first time one is asked for."""
    for name, module in _EXPORTS.items():
        value = getattr(importlib.import_module(module, __name__), name)
        if isinstance(value, type):
            # Public objects say they live here, not in a private module:
            # reprs, pickles of exceptions and the API reference show
            # ``trio_parallel_fs.X``.
            value.__module__ = __name__
        globals()[name] = value


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _load_all()
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
