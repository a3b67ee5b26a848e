"""What the Dask backend runs inside Dask workers: the context's plugin
(preload, and a log filter for our own jobs) and the probe that finds out
whether a job is running there.

This module travels to the workers *by value* (``trio_parallel_fs.dask``
registers it with cloudpickle), so the workers need ``distributed`` but not
trio_parallel_fs, and importing it there never pulls in trio. Keep it to the
standard library and ``distributed``.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

RUNNING = "running"
QUEUED = "queued"

#: Every job of ours is a Dask task whose key starts with this, so that the
#: log filters (here and in ``logs``) know our jobs from anyone else's,
#: in any process, from the key alone. Dask's dashboard groups tasks by the
#: words of the key before its random part: ours show as
#: ``trio_parallel_fs-<function>``.
JOB_KEY_PREFIX = "trio_parallel_fs-"


def is_our_job(key: object) -> bool:
    """Whether a Dask task key is one of our jobs' (keys of Dask collections
    are tuples: never ours)."""
    return isinstance(key, str) and key.startswith(JOB_KEY_PREFIX)


# The loggers of a Dask worker that write about our jobs: "Compute Failed"
# (distributed.worker) and "Async instruction ... ended with CancelledError"
# (the state machine's).
WORKER_LOGGERS = ("distributed.worker", "distributed.worker.state_machine")


class WorkerLogFilter(logging.Filter):
    """Drops a Dask worker's records about our jobs that the caller hears of
    anyway, and nothing else.

    * ``Compute Failed`` (an ERROR with the key as its first argument): the
      job raised; the caller gets the exception with the worker's traceback.
    * ``Async instruction for <Task ... name="execute('KEY')" ...> ended with
      CancelledError`` (a WARNING): the worker is closing while it runs the
      job, which is how ``kill_on_cancel`` stops a job; the caller gets
      ``trio.Cancelled``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg
        if not isinstance(message, str):
            return True
        if message.startswith("Compute Failed"):
            args = record.args
            return not (isinstance(args, tuple) and args and is_our_job(args[0]))
        if message.startswith("Async instruction for") and message.endswith("ended with CancelledError"):
            # The message comes formatted: the task's name holds the key's
            # repr, in single quotes (our keys hold no quote).
            return f"execute('{JOB_KEY_PREFIX}" not in message
        return True


class ContextPlugin(WorkerPlugin):
    """A context's plugin on every worker, registered when the context opens
    and removed when it closes.

    On a worker that joins, before its first job: imports the ``preload``
    modules, then quiets the worker's log records about our jobs
    (`WorkerLogFilter`) until the context closes. A worker sets its plugins up
    after registering with the scheduler and before it reads its first message
    from it, so no task can start before ``setup`` has returned.
    """

    def __init__(self, modules: tuple[str, ...]) -> None:
        self.modules = modules
        self._filter: WorkerLogFilter | None = None

    def setup(self, worker: Any) -> None:
        # The imports first: if one fails, the plugin fails to set up and no
        # filter is left behind to remove.
        for name in self.modules:
            importlib.import_module(name)
        self._filter = WorkerLogFilter()
        for name in WORKER_LOGGERS:
            logging.getLogger(name).addFilter(self._filter)

    def teardown(self, worker: Any) -> None:
        if self._filter is not None:
            for name in WORKER_LOGGERS:
                logging.getLogger(name).removeFilter(self._filter)
            self._filter = None


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
