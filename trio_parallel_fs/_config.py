"""A worker context's configuration: frozen, validated at the call that makes it.

Every knob is documented once, here, on ``WorkerConfig``; the functions that
accept these keywords refer to it.
"""

from __future__ import annotations

import difflib
import enum
import math
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import cloudpickle

from _trio_parallel_fs_worker._memory import METRICS
from _trio_parallel_fs_worker._settings import TemplateSettings, WorkerHooks, WorkerSettings


class WorkerType(str, enum.Enum):
    """How new workers are made.

    ``FORKSERVER`` (the default where ``os.fork`` exists): a preloaded template
    process forks each worker, in milliseconds, sharing its imports
    copy-on-write. ``FORK`` is accepted as an alias, so that trio-parallel code
    keeps working; it too forks from the template, never from your process.
    ``SPAWN``: each worker is a fresh interpreter (Windows will need it; Windows
    is not supported yet). Members compare equal to their values, and the
    strings ``"forkserver"``, ``"fork"`` and ``"spawn"`` are accepted wherever a
    WorkerType is.
    """

    FORKSERVER = "forkserver"
    FORK = "forkserver"  # alias: trio-parallel's name; forking the parent itself is unsafe
    SPAWN = "spawn"

    @classmethod
    def _missing_(cls, value: object) -> WorkerType | None:
        return cls.FORKSERVER if value == "fork" else None


DEFAULT_WORKER_TYPE = WorkerType.SPAWN if sys.platform == "win32" else WorkerType.FORKSERVER


def _to_worker_type(value: object) -> WorkerType:
    if isinstance(value, WorkerType):
        return value
    try:
        return WorkerType(value)
    except ValueError:
        choices = "'forkserver', 'fork', 'spawn'"
        raise ValueError(
            f"worker_type must be a WorkerType or one of {choices}, not {value!r}"
        ) from None


def _check_number(name: str, value: object, *, minimum: float, allow_inf: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__} {value!r}")
    if math.isnan(value) or value < minimum or (math.isinf(value) and not allow_inf):
        bound = "non-negative" if minimum == 0 else f">= {minimum}"
        extra = " (math.inf for no limit)" if allow_inf else ""
        raise ValueError(f"{name} must be {bound}{extra}, not {value!r}")


def _seconds(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    _check_number(attribute.name, value, minimum=0, allow_inf=True)


# A busy-wait burns a CPU while it lasts: keep it short whatever the caller asks.
MAX_BUSY_WAIT = 0.01


def _busy_wait(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    _check_number(attribute.name, value, minimum=0, allow_inf=True)  # infinity is too long, below
    if value > MAX_BUSY_WAIT:  # type: ignore[operator]
        raise ValueError(
            f"{attribute.name} must be at most {MAX_BUSY_WAIT} seconds (it spins a CPU while it waits; "
            f"for longer waits the processes block), not {value!r}"
        )


def _optional_count(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{attribute.name} must be an int or None, not {value!r}")
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1 (or None for no limit), not {value}")


def _count_or_zero(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{attribute.name} must be an int, not {value!r}")
    if value < 0:
        raise ValueError(f"{attribute.name} must be non-negative, not {value}")


def _callable(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not callable(value):
        raise TypeError(
            f"{attribute.name} must be callable without arguments, not {type(value).__name__} "
            f"{value!r}"
        )


def _optional_callable(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _callable(instance, attribute, value)


def preload_modules(value: object) -> tuple[str, ...]:
    """``preload`` as a tuple of module names, checked: the one rule for every
    worker type (the Dask context's too)."""
    if isinstance(value, str):
        raise TypeError(f"preload takes a list of module names, not a string; did you mean [{value!r}]?")
    if not isinstance(value, Iterable):
        raise TypeError(f"preload must be a list of module names, not {value!r}")
    names = tuple(value)
    for name in names:
        if not isinstance(name, str) or not name or name.startswith("."):
            raise ValueError(f"preload entries must be absolute module names, not {name!r}")
    return names


def _metric(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value not in METRICS:
        raise ValueError(f"memory_metric must be one of {METRICS}, not {value!r}")


@attrs.frozen
class WorkerConfig:
    """How a worker context makes, runs and retires its workers.

    Most users set at most the first nine: trio-parallel's five (which keep
    their meaning and order, so they may also be given positionally), then
    what to preload and when to retire a worker. The others tune one concern
    each and are grouped after them; their defaults suit most programs.

    Attributes:
        idle_timeout: Seconds an idle worker waits for a job before it exits and
            frees its memory. ``math.inf`` waits forever. Default 600.
        init: Called without arguments in each new worker before its first job;
            for per-worker state. If it raises, the call that started the worker
            fails with `WorkerHookError`. Default: do nothing.
        retire: Called without arguments in the worker after each job; a truthy
            result retires the worker (it leaves after sending that job's result).
            If it raises, that call fails with `WorkerHookError`. Default: never.
        grace_period: Seconds to wait, when the context closes, for workers to
            exit before killing them (and raising `BrokenWorkerError`).
            Default 30.
        worker_type: A `WorkerType`. Default ``FORKSERVER`` where fork exists.
        preload: Names of modules to import once in the template, so workers
            start with them already imported (shared copy-on-write). With
            ``SPAWN`` each worker imports them when it starts. A module that
            fails to import, or starts threads, fails the context's start with
            `TemplateStartError`. Default: none.
        max_jobs: Retire a worker after this many jobs. Default: no limit.
        max_memory: Retire a worker after a job that leaves it using more than
            this many bytes (by ``memory_metric``). Default: no limit.
        memory_ceiling: Kill a worker *while its job runs* once it uses more than
            this many bytes; the caller gets `MemoryCeilingError`. Checked every
            20 ms, by the template (``FORKSERVER``) or by a thread of this
            process (``SPAWN``). Default: no ceiling.

    Tuning: the template. ``template_init`` goes with ``preload`` (one
    decision: what workers share, and how warm); ``blas_threads`` matters
    once a preloaded module has a BLAS or OpenMP pool.

    Attributes:
        template_init: Called without arguments in the template after the
            preload and before ``gc.freeze()``, to warm up what workers will
            share: e.g. run a tiny BLAS operation so that every worker inherits
            an initialized BLAS instead of initializing its own copy. Like the
            preload, it must not leave threads running. With ``SPAWN`` it runs
            in each worker as it starts. Default: none.
        blas_threads: Thread count for BLAS/OpenMP pools (OPENBLAS_NUM_THREADS
            and friends), set in the workers' environment unless you set those
            variables yourself. 1 keeps the template single-threaded and stops
            N workers from running N x cores threads. None leaves them alone.

    Tuning: recycling. ``max_jobs_jitter`` is part of the ``max_jobs``
    decision (it needs ``max_jobs``), and ``memory_metric`` of the memory
    one: it says how both ``max_memory`` and ``memory_ceiling`` measure.

    Attributes:
        max_jobs_jitter: Add a random 0..max_jobs_jitter jobs to each worker's
            ``max_jobs``, so that workers started together do not all retire
            (and restart) together. Default 0.
        memory_metric: ``"uss"`` (private memory, the default: pages shared with
            the template are not counted), ``"pss"`` or ``"rss"``.

    Tuning: large arguments and results. ``shm_threshold`` and ``shm_max``
    are one decision, whether and for what sizes to use the shared memory
    area: ``shm_max=0`` turns it off; ``shm_idle`` says how long it keeps
    its memory when unused.

    Attributes:
        shm_threshold: Bytes. When the large buffers of a job's arguments (numpy
            arrays, bytes, bytearrays: pickle protocol 5 out-of-band buffers of
            64 KiB or more) total at least this, they travel through the
            worker's shared memory area instead of its socket: copied in once by
            this process, read in place by the job. The same holds for a result,
            which you get straight from the area, not copied (it stays valid
            after the worker and the context are gone; ``np.array(result)``
            copies it). Each worker gets its area with its first job; it is
            reused and grows as needed; it needs a Unix socket channel and
            ``memfd_create`` or ``shm_open``, and elsewhere everything goes over
            the socket. Default 1 MiB.
        shm_max: Bytes: the most one worker's shared memory area may grow to.
            Buffers that would not fit go over the socket instead. 0 turns the
            area off. Default 2 GiB.
        shm_idle: Seconds an area may go unused before this process gives its
            memory back, all but the results you still hold (Linux; elsewhere
            it goes with its worker); the next large transfer allocates pages
            again. ``math.inf`` keeps it. Default 5.

    Tuning: latency of quick calls.

    Attributes:
        busy_wait: Seconds. While jobs and replies follow each other quickly,
            a worker waiting for its next job, and a call waiting for its
            reply, first look for it in a loop for up to this long instead of
            sleeping: waking a sleeping process costs tens of microseconds on
            many machines, twice per call. Each end does so only while its
            recent waits were shorter than this, and gives the CPU away between
            two looks, so slow jobs and pauses cost no CPU; the caller's loop
            lets other Trio tasks run. Where the waits are longer but regular
            (a loop with its own work between calls), the worker sleeps until
            shortly before the job is due and busy-waits from there, at most
            this long (a loop that sleeps a millisecond or more between
            calls gains nothing from that: 0 suits it better). 0 never
            busy-waits. At most 0.01. Default 0.0002.
    """

    idle_timeout: float = attrs.field(default=600.0, validator=_seconds)
    init: Callable[[], object] = attrs.field(default=bool, validator=_callable)
    retire: Callable[[], object] = attrs.field(default=bool, validator=_callable)
    grace_period: float = attrs.field(default=30.0, validator=_seconds)
    worker_type: WorkerType = attrs.field(default=DEFAULT_WORKER_TYPE, converter=_to_worker_type)
    preload: tuple[str, ...] = attrs.field(default=(), converter=preload_modules)
    template_init: Callable[[], object] | None = attrs.field(default=None, validator=_optional_callable)
    max_jobs: int | None = attrs.field(default=None, validator=_optional_count)
    max_jobs_jitter: int = attrs.field(default=0, validator=_count_or_zero)
    max_memory: int | None = attrs.field(default=None, validator=_optional_count)
    memory_metric: str = attrs.field(default="uss", validator=_metric)
    memory_ceiling: int | None = attrs.field(default=None, validator=_optional_count)
    blas_threads: int | None = attrs.field(default=1, validator=_optional_count)
    shm_threshold: int = attrs.field(default=1 << 20, validator=_count_or_zero)
    shm_max: int = attrs.field(default=2 << 30, validator=_count_or_zero)
    shm_idle: float = attrs.field(default=5.0, validator=_seconds)
    busy_wait: float = attrs.field(default=0.0002, validator=_busy_wait)

    def __attrs_post_init__(self) -> None:
        if self.worker_type is WorkerType.FORKSERVER and sys.platform == "win32":
            raise ValueError("worker_type FORKSERVER needs os.fork; use WorkerType.SPAWN on Windows")
        if self.max_jobs_jitter and self.max_jobs is None:
            raise ValueError("max_jobs_jitter needs max_jobs: it spreads the retirements max_jobs causes")

    def worker_hooks(self) -> WorkerHooks:
        """The limits and callables each worker applies (see `WorkerHooks`)."""
        return WorkerHooks(
            idle_timeout=self.idle_timeout,
            init=self.init,
            retire=self.retire,
            max_jobs=self.max_jobs,
            max_jobs_jitter=self.max_jobs_jitter,
            max_memory=self.max_memory,
            memory_metric=self.memory_metric,
            busy_wait=self.busy_wait,
        )

    @property
    def preloads_in_each_worker(self) -> bool:
        """Whether each worker imports the preload or runs ``template_init``
        itself (``SPAWN``: there is no template), and has one of them to run."""
        return self.worker_type is WorkerType.SPAWN and (bool(self.preload) or self.template_init is not None)

    def worker_settings(self, hooks: bytes | None = None) -> WorkerSettings:
        """A new worker's start-up message, made now (it carries this moment's
        working directory). ``hooks``: `worker_hooks` already pickled, if at hand."""
        spawned = self.worker_type is WorkerType.SPAWN
        try:
            cwd = os.getcwd()
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                exc.errno,
                "this process's working directory was removed, and a worker starts in its caller's: "
                "change to one that exists",
            ) from None
        return WorkerSettings(
            cwd=cwd,
            sys_path=self.sys_path() if spawned else None,
            preload=self.preload if spawned else (),
            template_init=self.pickled_template_init() if spawned else None,
            hooks=hooks if hooks is not None else cloudpickle.dumps(self.worker_hooks()),
        )

    @staticmethod
    def sys_path() -> list[str]:
        """This process's import path, for children that must import as it does."""
        return list(sys.path)

    def pickled_template_init(self) -> bytes | None:
        # Unpickled only after sys.path is set and the preload is imported.
        return None if self.template_init is None else bytes(cloudpickle.dumps(self.template_init))

    def template_settings(self) -> TemplateSettings:
        return TemplateSettings(
            sys_path=self.sys_path(),
            preload=self.preload,
            template_init=self.pickled_template_init(),
            memory_ceiling=self.memory_ceiling,
            memory_metric=self.memory_metric,
            # Spares kept for a burst are idle workers: no longer than those,
            # and at most EXTRA_SPARES_FOR, as idle areas give memory back.
            extra_spares_for=min(self.idle_timeout, EXTRA_SPARES_FOR),
        )


# How long spares beyond the first, kept after a burst of single-use workers
# for the next one, may wait unused (see _trio_parallel_fs_worker._template).
EXTRA_SPARES_FOR = 10.0

# trio-parallel accepts its five settings positionally, in this order.
POSITIONAL = ("idle_timeout", "init", "retire", "grace_period", "worker_type")


def make_config(function: str, args: tuple[Any, ...], config: dict[str, Any]) -> WorkerConfig:
    """A `WorkerConfig` from the arguments given to ``function`` (named in errors)."""
    if len(args) > len(POSITIONAL):
        raise TypeError(
            f"{function}() takes at most {len(POSITIONAL)} positional arguments ({', '.join(POSITIONAL)}, "
            f"as in trio-parallel), not {len(args)}; pass the others by keyword"
        )
    names = [field.name for field in attrs.fields(WorkerConfig)]
    for name in config:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; the keywords are {', '.join(names)}"
            raise TypeError(f"{function}() got an unexpected keyword argument {name!r}{hint}")
    for name, value in zip(POSITIONAL, args, strict=False):
        if name in config:
            raise TypeError(f"{function}() got multiple values for argument {name!r}")
        config[name] = value
    return WorkerConfig(**config)
