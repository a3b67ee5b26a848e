"""What the parent tells a worker and the template, as typed records.

The parent's ``WorkerConfig`` holds the user's knobs and their defaults; these
records carry the knobs to the child, every field filled in by the parent, so
no default is repeated on this side. Only the template's internal tuning
(``ceiling_interval``) has its default here, where it is defined.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class WorkerHooks:
    """The per-worker limits and callables (pickled with cloudpickle, since the
    callables may be defined in ``__main__``)."""

    idle_timeout: float
    init: Callable[[], object]
    retire: Callable[[], object]
    max_jobs: int | None
    max_jobs_jitter: int
    max_memory: int | None
    memory_metric: str
    busy_wait: float


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    """A worker's start-up message (its Config frame).

    ``hooks`` is unpickled last: unpickling a hook may import the user's
    modules, which needs ``sys_path`` (and, for a spawned worker, the preload).

    Attributes:
        cwd: The parent's working directory when this worker started; the worker
            starts there, on every backend, so relative paths resolve alike.
        sys_path: The parent's ``sys.path`` (spawned workers; None when forked:
            they have the template's).
        preload: Modules to import first (spawned workers; forked ones have them).
        template_init: The pickled ``template_init`` to run once (spawned workers).
        hooks: A pickled `WorkerHooks`.
    """

    cwd: str
    sys_path: list[str] | None
    preload: tuple[str, ...]
    template_init: bytes | None
    hooks: bytes


@dataclasses.dataclass(frozen=True)
class TemplateSettings:
    """The template's start-up message.

    Attributes:
        sys_path: The parent's ``sys.path``, so preloads import as they would there.
        preload: Modules to import once, before ``gc.freeze()``.
        template_init: The pickled ``template_init``, or None.
        memory_ceiling: Bytes above which a busy worker is killed, or None.
        memory_metric: How that is measured (``"uss"``, ``"pss"``, ``"rss"``).
        ceiling_interval: Seconds between two checks of the ceiling.
        extra_spares_for: Seconds that spares beyond the first outlive the
            last request made ahead of demand (each holds a few MB).
    """

    sys_path: list[str]
    preload: tuple[str, ...]
    template_init: bytes | None
    memory_ceiling: int | None
    memory_metric: str
    ceiling_interval: float = 0.02
    extra_spares_for: float = 10.0


class WorkerSetupError(RuntimeError):
    """The worker could not set itself up before its init hook: the parent's
    working directory, or (a spawned worker, which has no template) a preload
    or ``template_init``. Its cause is the original error."""


class PreloadError(WorkerSetupError):
    """A spawned worker's preload or ``template_init`` raised: what a template
    reports by failing to start, so the parent raises it as the template's
    start error (``TemplateStartError``). Its cause is the original error."""


class TemplateInitError(PreloadError):
    """``template_init`` raised, in the template or in a spawned worker: so
    that the parent's message names it, not the preload. Its cause is the
    original error."""
