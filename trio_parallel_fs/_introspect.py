"""A supported internal way to see a context's processes, for the pytest plugin,
the tests and the benchmarks (instead of reaching into the pool's attributes).

Not public API: names here may change with the pool, but this module keeps
its two functions working.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import psutil

if TYPE_CHECKING:
    from ._frontend import WorkerContext


@attrs.frozen
class ProcessRecord:
    """One process of a context: ``role`` is ``"template"``, ``"spare"`` (forked
    ahead of demand by the template) or ``"worker"``."""

    pid: int
    role: str


def context_processes(context: WorkerContext) -> list[ProcessRecord]:
    """The context's live processes now: its template, the template's spare, and
    every worker the pool knows (idle or busy) whose pid is known."""
    pool = context._pool
    records: list[ProcessRecord] = []
    template_pid = pool.statistics().template_pid
    worker_pids = set(pool.worker_pids())
    if template_pid is not None:
        records.append(ProcessRecord(template_pid, "template"))
        try:
            children = psutil.Process(template_pid).children()
        except psutil.Error:
            children = []
        # The template's children are its workers and its spare; the pool knows
        # the workers, so the one left over is the spare.
        records.extend(ProcessRecord(child.pid, "spare") for child in children if child.pid not in worker_pids)
    records.extend(ProcessRecord(pid, "worker") for pid in sorted(worker_pids))
    return records


def watch_workers(context: WorkerContext, callback: Callable[[int], None]) -> None:
    """Call ``callback(pid)`` for each worker the context starts from now on, as
    soon as its pid is known (at once for spawned workers; forked workers' pids
    arrive from the template a moment later)."""
    context._pool.observers.append(callback)
