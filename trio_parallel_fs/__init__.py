"""trio_parallel_fs: run CPU-bound sync functions from Trio in worker processes
forked from a preloaded template.

A drop-in for trio-parallel: the same names and keywords, plus ``preload``,
recycling by job count and memory, and a memory ceiling.
"""

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
from ._frontend import open_worker_context as open_worker_context
from ._frontend import run_sync as run_sync
from ._pool import WorkerContextStatistics as WorkerContextStatistics

__version__ = "0.1.0"


__all__ = [
    "BrokenWorkerError",
    "MemoryCeilingError",
    "RemoteTraceback",
    "TemplateStartError",
    "WorkerConfig",
    "WorkerContext",
    "WorkerContextStatistics",
    "WorkerHookError",
    "WorkerType",
    "cache_scope",
    "configure_default_context",
    "current_default_process_limiter",
    "current_default_worker_limiter",
    "default_context_statistics",
    "open_worker_context",
    "run_sync",
]

# Public objects say they live here, not in a private module: reprs, pickles
# of exceptions and the API reference show ``trio_parallel_fs.X``.
for _name in __all__:
    if isinstance(globals()[_name], type):
        globals()[_name].__module__ = __name__
del _name
