"""What the Dask backend runs inside Dask workers: the preload plugin and the
probe that finds out whether a job is running there.

This module travels to the workers *by value* (``trio_parallel_fs.dask``
registers it with cloudpickle), so the workers need ``distributed`` but not
trio_parallel_fs, and importing it there never pulls in trio. Keep it to the
standard library and ``distributed``.
"""

from __future__ import annotations

import importlib
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

RUNNING = "running"
QUEUED = "queued"


class PreloadPlugin(WorkerPlugin):
    """Imports modules on a worker when it joins, before it takes its first job.

    A worker sets its plugins up after registering with the scheduler and
    before it reads its first message from it, so no task can start before
    ``setup`` has returned.
    """

    def __init__(self, modules: tuple[str, ...]) -> None:
        self.modules = modules

    def setup(self, worker: Any) -> None:
        for name in self.modules:
            importlib.import_module(name)


# A worker's task states for a task it has been given and not started yet.
_NOT_STARTED = frozenset({"waiting", "ready", "constrained"})


def job_state(key: str, dask_worker: Any) -> str | None:
    """Where job ``key`` stands on this worker: `RUNNING` (a thread runs it,
    even if Dask has already cancelled it), `QUEUED` (given to this worker, not
    started, so it could still start), or None (not here, or done).

    Run through ``Client.run``, which passes the worker as ``dask_worker``.
    """
    state = dask_worker.state
    task = state.tasks.get(key)
    if task is None:
        return None
    # A cancelled task stays in ``executing`` until its thread returns: Dask
    # cannot stop a thread, which is why the caller restarts the worker.
    if task in state.executing or task in state.long_running:
        return RUNNING
    if task.state in _NOT_STARTED:
        return QUEUED
    return None


KILLED = "killed"


async def kill_worker_process(grace: float, dask_worker: Any) -> str:
    """Kill the worker process of this nanny; the nanny then starts a new one.

    Run on a nanny through ``Client.run(..., nanny=True)``, which passes the
    nanny as ``dask_worker``. The worker gets ``0.8 * grace`` seconds to close,
    then SIGKILL; this returns once the process is gone, so its CPU is free.
    Dask's own restart waits four seconds for the close, which a worker whose
    thread is busy with a job never finishes.
    """
    await dask_worker.kill(timeout=grace, reason="trio_parallel_fs: kill_on_cancel")
    return KILLED
