"""``map`` and ``imap``: many items, in chunks, through any worker type's `Runner`.

Theory of operation
-------------------
One job per item costs a round trip per item. Here a job is a *chunk*:
consecutive items that one worker runs in a row (``_trio_parallel_fs_worker
._chunks.run_chunk``), sent and settled as any job is, by the `_calls.Runner`
of the context (a local worker context or a Dask context). So there is one
``map`` for every worker type, and a chunk of large arrays takes the same
shared memory path as a ``run_sync`` of them.

A producer task reads the input lazily and cuts it into chunks; each chunk is
a task that takes a limiter token (as many chunks run at once as the limiter
allows), runs, and hands its results on. The *window* bounds the chunks
between being read and being handed to the caller (``2 * tokens + 1``: one
running per token, and as many read and pickled ready to go), so neither the
input nor the results pile up, however long the input and however slow the
consumer. ``map`` keeps every result, so its window counts chunks until they
finish, not until they are read.

Lanes (a local context's chunks): a worker that finishes a chunk and waits
for the parent to read its reply and send the next one waits for a CPU too,
when the map's workers keep every core busy. So on a local context the
chunks go through *lanes*: each holds a limiter token and leases one worker
(`_pool.lease.WorkerLease`) for as long as chunks are ready, and keeps the
next chunk queued in that worker's socket behind the running one
(`IN_FLIGHT`), so that the worker starts it at once. A chunk is queued only
if it is expected to be short (`AHEAD_SECONDS`) and the worker's channel can
take it without the shared memory area (see `PooledWorker.can_send_ahead`);
else it waits for the reply before it. A lane ends when no chunk is ready
and none is in flight, giving its token and worker back. A worker that
retires after a chunk leaves the queued one unread: the lease sends it to
another worker. A Dask context runs each chunk as one task (`_run_chunk`):
its scheduler queues them.

Chunk sizes (`ChunkSizer`), when the caller gives none: one item per chunk
until the first chunks come back, then as many items as take `TARGET_SECONDS`
by the time per item the workers measured (longer where a chunk's round trip
costs more, as on a Dask cluster: `OVERHEAD_FACTOR`), growing at most
`GROWTH` times the largest chunk measured so far, and never above
`MAX_CHUNK_ITEMS`. Where the input's length is known, a chunk
also holds at most its share of the work left (guided scheduling: the last
chunks shrink, so that no worker finishes long after the others).

Errors, as the builtin ``map`` would have them: the exception raised is that
of the first failing item in input order, with a note naming the item. When
an item fails, no new chunk starts, chunks of later items are cancelled, and
chunks of earlier items finish (one of them may fail first). A worker that
dies names its chunk's items (which of them was running is not known); the
chunk queued behind it never started, and is dropped as a later chunk.

Cancellation follows ``run_sync``'s rules chunk by chunk: a chunk waiting for a
token is cancelled; a running chunk finishes (shielded) unless
``kill_on_cancel``, which kills its worker. A chunk queued in a worker's
socket runs too (it cannot be taken back), which is why only short ones are
queued; after a failure, its results are dropped. The call returns only once
nothing of it runs or waits.

One code for both event loops: the nursery, the cancellable scopes, the
window's semaphore and the parking lot come from `_loops` (Trio's own under
Trio; under asyncio anyio's task group and cancel scopes, whose cancellation
of a running chunk `_calls._run`'s shield holds off like any other).
"""

from __future__ import annotations

import itertools
import math
import operator
import pickle
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, TypeVar, cast

import cloudpickle

from _trio_parallel_fs_worker._chunks import ITEM_INDEX, run_chunk

from . import _loops
from ._calls import Runner, _run, check_limiter, check_sync
from ._describe import describe
from ._errors import closed_while_waiting
from ._pool.lease import WorkerLease
from ._pool.pool import WorkerPool

T = TypeVar("T")

#: Seconds of work a chunk aims at: a chunk's round trip costs some 0.1 ms,
#: which this amortises to about 1%, while the last chunks still end close
#: together.
TARGET_SECONDS = 0.01
#: Where the input's length is known, the last chunks shrink to their share of
#: the work left, but not below this: tinier chunks cost more than they balance.
TAIL_FLOOR_SECONDS = 0.001
#: How many times the largest measured chunk the next one may hold: the time
#: per item from small chunks is a rough guess.
GROWTH = 4
#: Each chunk holds its share of the work left split this many times per worker.
TAIL_SHARES = 2
#: A chunk also aims at this many times what one costs beyond its items'
#: work (its round trip, measured): on a Dask cluster, milliseconds.
OVERHEAD_FACTOR = 20
#: The most items a chunk holds: bounds what a map reads ahead of its caller
#: (a window of chunks) when items take next to nothing, where a chunk of
#: this many still holds milliseconds of work.
MAX_CHUNK_ITEMS = 1 << 17
#: Bytes of arrays (and other buffers) a chunk aims at, when items hold them.
TARGET_BYTES = 16 << 20
#: How much the time-per-item figures of older chunks count against newer
#: ones (the items' cost may drift along the input).
DECAY = 0.8
#: Chunks in flight on one worker of a local context: the one running, and
#: the next, queued in its socket (see "Lanes" in the module's docstring).
IN_FLIGHT = 2
#: A chunk is queued behind a running one only if its items are expected to
#: take at most this long: a queued chunk runs even if the map is cancelled
#: meanwhile (unless ``kill_on_cancel``), and a long chunk gains nothing.
AHEAD_SECONDS = 4 * TARGET_SECONDS


def _add_note(exc: BaseException, note: str) -> None:
    if sys.version_info >= (3, 11):
        exc.add_note(note)
    else:
        # PEP 678's attribute, which the exceptiongroup backport (a trio
        # and anyio dependency on 3.10) prints in tracebacks.
        notes = getattr(exc, "__notes__", None)
        try:
            if isinstance(notes, list):
                notes.append(note)
            else:
                exc.__notes__ = [note]  # type: ignore[attr-defined]
        except AttributeError:  # no __dict__: the note is lost, not the exception
            pass


def _item_bytes(item: Any, star: bool) -> int:
    """The size of the buffers an item holds (numpy arrays, bytes), roughly."""
    parts = item if star else (item,)
    total = 0
    for part in parts:
        size = getattr(part, "nbytes", None)
        if isinstance(size, int):
            total += size
        elif isinstance(part, (bytes, bytearray)):
            total += len(part)
    return total


class ChunkSizer:
    """How many items the next chunk takes (see the module's docstring).

    Args:
        workers: Chunks that run at once (the limiter's tokens).
        total: The input's length, if known.
        fixed: The caller's ``chunksize``, if given: every chunk takes that many.
    """

    def __init__(self, workers: int, total: int | None, fixed: int | None) -> None:
        self.workers = max(1, workers)
        self.total = total
        self.fixed = fixed
        self._seconds = 0.0  # decayed sums of the measured chunks
        self._items = 0.0
        self._overhead = math.inf  # the least a chunk has cost beyond its items
        self._largest = 0  # the largest chunk measured so far
        self._bytes_per_item = 0.0

    @property
    def measured_any(self) -> bool:
        return self._largest > 0

    def size(self, taken: int) -> int:
        """The next chunk's size, ``taken`` items having been read so far."""
        if self.fixed is not None:
            return self.fixed
        if self._largest == 0:
            size = 1  # nothing measured yet: slow items must spread too
        else:
            per_item = self._seconds / self._items
            seconds = max(TARGET_SECONDS, OVERHEAD_FACTOR * self._overhead)
            if self.total is not None:
                share = (self.total - taken) * per_item / (TAIL_SHARES * self.workers)
                floor = max(TAIL_FLOOR_SECONDS, OVERHEAD_FACTOR / 4 * self._overhead)
                seconds = min(seconds, max(floor, share))
            by_time = max(1, round(seconds / per_item)) if per_item > 0 else MAX_CHUNK_ITEMS
            size = min(GROWTH * self._largest, by_time, MAX_CHUNK_ITEMS)
        if self._bytes_per_item > 0:
            size = min(size, max(1, int(TARGET_BYTES / self._bytes_per_item)))
        return size

    def expected_seconds(self, items: int) -> float:
        """How long ``items`` items are expected to take in a worker (inf
        before any chunk was measured)."""
        if not self._items:
            return math.inf
        return items * self._seconds / self._items

    def measured(self, items: int, seconds: float, overhead: float = 0.0) -> None:
        """A chunk of ``items`` items took ``seconds`` in its worker, and
        ``overhead`` more from the caller's side."""
        # The least, not an average: a chunk's cost beyond its items grows with
        # its size (pickling, copying), and an average would grow the chunks
        # that grow it, without end. What a round trip costs at least is the
        # fixed part.
        self._overhead = min(self._overhead, overhead)
        self._seconds = self._seconds * DECAY + seconds
        self._items = self._items * DECAY + items
        self._largest = max(self._largest, items)

    def sampled_bytes(self, item_bytes: int) -> None:
        """One item of the latest chunk holds ``item_bytes`` bytes of buffers."""
        self._bytes_per_item = item_bytes if not self._bytes_per_item else (self._bytes_per_item + item_bytes) / 2


def check_chunksize(chunksize: object) -> int | None:
    if chunksize is None:
        return None
    if not isinstance(chunksize, int) or isinstance(chunksize, bool):
        raise TypeError(f"chunksize must be a positive int or None (sized automatically), not {chunksize!r}")
    if chunksize < 1:
        raise ValueError(f"chunksize must be at least 1 (or None: sized automatically), not {chunksize!r}")
    return chunksize


def _open_inputs(name: str, iterables: tuple[Any, ...]) -> tuple[Iterator[Any], bool, int | None]:
    """The items (tuples when several iterables are zipped), whether they are
    zipped, and how many there are if the inputs say."""
    if not iterables:
        raise TypeError(f"{name} needs at least one iterable after the function")
    iterators = []
    for position, iterable in enumerate(iterables):
        try:
            iterators.append(iter(iterable))
        except TypeError:
            hint = ""
            if hasattr(iterable, "__aiter__"):
                hint = "; it is an async iterable, which a worker cannot read: collect its items first"
            raise TypeError(
                f"{name} needs iterables after the function; argument {position + 1} is "
                f"{type(iterable).__name__} {iterable!r}, which is not iterable{hint}"
            ) from None
    lengths = [operator.length_hint(iterable, -1) for iterable in iterables]
    # A hint of 0 may mean "unknown" as well as "empty": an empty input ends at
    # its first read anyway.
    known = [length for length in lengths if length > 0]
    total = min(known) if known and len(known) == len(lengths) else None
    if len(iterators) == 1:
        return iterators[0], False, total
    return zip(*iterators, strict=False), True, total  # the shortest ends the map, as in the builtin


def _tokens(limiter: Any, runner: Runner) -> int:
    """How many chunks may run at once: the limiter's tokens (the default
    limiter's, for a limiter that does not say)."""
    tokens = getattr(limiter, "total_tokens", None)
    if not isinstance(tokens, (int, float)) or tokens < 1:
        tokens = getattr(runner._default_limiter(), "total_tokens", 1)
    assert isinstance(tokens, (int, float))
    return 1024 if tokens == math.inf else int(tokens)


class _Failure:
    """The first failing item so far: its exception, the index to order
    failures by, and the start of its chunk."""

    def __init__(self, error: BaseException, index: int, chunk_start: int) -> None:
        self.error = error
        self.index = index
        self.chunk_start = chunk_start


def _checked_chunk(outcome: Any, count: int) -> tuple[list[Any], float]:
    """A chunk's ``(results, seconds)`` as a worker sent them, checked where
    they are used: one result per item (a short list would end an ordered
    imap early, a long one shift every later result), and seconds the sizer
    can use (a NaN would pin every later chunk at its largest)."""
    try:
        results, seconds = outcome
    except (TypeError, ValueError):
        raise RuntimeError(f"a map chunk of {count} items came back as {type(outcome).__name__}") from None
    if type(results) is not list or len(results) != count:
        raise RuntimeError(
            f"a map chunk of {count} items came back with "
            f"{len(results) if isinstance(results, list) else type(results).__name__} results"
        )
    if not (isinstance(seconds, float) and 0.0 <= seconds < math.inf):
        seconds = 0.0
    return results, seconds


class _Chunk:
    """A chunk of a lane-driven map (a local context), from the moment it is
    read until it settles: in ``ready``, then in a lane's ``sent``. Its
    ``cancel`` (a failure before it) drops it, or its results if sent."""

    __slots__ = ("start", "count", "job", "cancel_called")

    def __init__(self, start: int, count: int, job: Any) -> None:
        self.start = start
        self.count = count
        self.job = job
        self.cancel_called = False

    def cancel(self) -> None:
        self.cancel_called = True


class _Lane:
    """One limiter token and one leased worker, with the chunks sent to it."""

    def __init__(self, scope: Any) -> None:
        self.scope = scope  # cancelled to kill its worker (kill_on_cancel, after a failure)
        self.sent: deque[_Chunk] = deque()


def _pool_of(runner: Runner) -> WorkerPool | None:
    """The pool of a local context, whose workers a map may lease; None for
    a runner without one (a Dask context)."""
    pool = getattr(runner, "_pool", None)
    return pool if isinstance(pool, WorkerPool) else None


class _Mapping:
    """One map's run: the producer, its chunks, and what they settled."""

    def __init__(
        self,
        name: str,
        get_runner: Callable[[], Runner],
        fn: Callable[..., Any],
        iterables: tuple[Any, ...],
        *,
        ordered: bool,
        keep_all: bool,
        chunksize: object,
        kill_on_cancel: bool,
        limiter: Any,
    ) -> None:
        check_sync(fn)
        fixed = check_chunksize(chunksize)
        self.items, self.star, total = _open_inputs(name, iterables)
        self.loop = _loops.current()
        runner = get_runner()
        if limiter is None:
            limiter = runner._default_limiter()
        elif not self.loop.is_limiter(limiter):
            check_limiter(limiter, self.loop)
        tokens = _tokens(limiter, runner)
        self.name = name
        self.get_runner = get_runner
        self.fn = fn
        self.ordered = ordered
        self.keep_all = keep_all  # map: every result kept; the window frees a chunk as it finishes
        self.kill_on_cancel = kill_on_cancel
        self.limiter = limiter
        self.sizer = ChunkSizer(tokens, total, fixed)
        self.tokens = tokens
        loop = self.loop
        # What a chunk lets through (see _run_chunk): cancellation and Ctrl-C.
        cancelled = loop.Cancelled if isinstance(loop.Cancelled, tuple) else (loop.Cancelled,)
        self.not_an_outcome: tuple[type[BaseException], ...] = (*cancelled, KeyboardInterrupt)
        self.window = loop.Semaphore(2 * tokens + 1)
        self.taken = 0  # items read from the input
        self.next_start = 0  # ordered: the first item not handed over yet
        self.finished: dict[int, list[Any]] = {}  # chunk start -> results, not handed over yet
        self.arrival: deque[int] = deque()  # unordered: chunk starts in the order they finished
        self.running: dict[int, Any] = {}  # chunk start -> its cancellable scope (or _Chunk), until it settles
        # A local context's chunks go through lanes (see the module's docstring).
        self.by_lanes = _pool_of(runner) is not None
        self.ready: deque[_Chunk] = deque()  # read and pickled, for the next lane with room
        self.lanes: list[_Lane] = []
        self.producing = True
        self.failure: _Failure | None = None
        self.producer_scope = loop.cancellable_scope()  # cancelled at a failure: it may wait for the window
        self.changed = loop.ParkingLot()

    # --- producing ----------------------------------------------------------------

    async def produce(self, nursery: Any) -> None:
        try:
            with self.producer_scope:
                await self._produce(nursery)
        finally:
            self.producing = False
            self.changed.unpark_all()

    async def _produce(self, nursery: Any) -> None:
        while self.failure is None:
            # Until a chunk has come back, read no further than the chunks that
            # can run: each costs a pickling on the way to the first result.
            while not self.sizer.measured_any and len(self.running) >= self.tokens:  # noqa: ASYNC110
                await self.changed.park()
            await self.window.acquire()
            if self.failure is not None:
                self.window.release()
                break
            start = self.taken
            items: list[Any] = []
            input_error: BaseException | None = None
            try:
                # extend() keeps the items read before the input raised.
                items.extend(itertools.islice(self.items, self.sizer.size(start)))
            except self.not_an_outcome:
                raise
            except BaseException as exc:  # noqa: BLE001 - the input's exception is the map's outcome
                input_error = exc
            if items:
                self.taken += len(items)
                if self.sizer.fixed is None:
                    self.sizer.sampled_bytes(_item_bytes(items[0], self.star))
                try:
                    job = self.get_runner()._prepare(run_chunk, (self.fn, start, items, self.star))
                except Exception as exc:  # noqa: BLE001 - a pickling error, whatever the pickler raises
                    self.window.release()
                    self._failed(self._unpicklable(start, items, exc) or _Failure(exc, start, start))
                    break
                if self.by_lanes:
                    chunk = _Chunk(start, len(items), job)
                    self.running[start] = chunk
                    self.ready.append(chunk)
                    if len(self.lanes) < self.tokens:
                        lane = _Lane(self.loop.cancellable_scope())
                        self.lanes.append(lane)
                        nursery.start_soon(self._run_lane, lane)
                    else:
                        self.changed.unpark_all()
                else:
                    scope = self.loop.cancellable_scope()
                    self.running[start] = scope
                    nursery.start_soon(self._run_chunk, start, items, job, scope)
            else:
                self.window.release()
            if input_error is not None:
                _add_note(input_error, f"raised by the input of {self.name} when asked for item {self.taken}")
                self._failed(_Failure(input_error, self.taken, self.taken))
                break
            if not items:
                break

    def _unpicklable(self, start: int, items: list[Any], exc: BaseException) -> _Failure | None:
        """Which of the function and the chunk's items did not pickle, in an
        error that names it (the pickler's own says neither); None if each
        pickles alone."""
        for index, value in [(None, self.fn), *enumerate(items, start)]:
            try:
                cloudpickle.dumps(value)
            except Exception as culprit_error:  # noqa: BLE001 - any failure names the culprit
                what = "the function" if index is None else f"item {index}"
                error = pickle.PicklingError(
                    f"{self.name} cannot send {describe(self.fn)} to a worker: {what} "
                    f"({type(value).__name__}) could not be pickled ({type(culprit_error).__name__}: {culprit_error})"
                )
                error.__cause__ = culprit_error
                return _Failure(error, start if index is None else index, start)
        return None

    # --- one chunk ------------------------------------------------------------------

    async def _run_chunk(self, start: int, items: list[Any], job: Any, scope: Any) -> None:
        count = len(items)
        try:
            with scope:
                async with self.limiter:
                    began = time.perf_counter()
                    results, seconds = _checked_chunk(
                        await _run(self.get_runner, self.fn, job, self.kill_on_cancel, self.loop), count
                    )
                    overhead = max(0.0, time.perf_counter() - began - seconds)
        except self.not_an_outcome:
            raise
        except BaseException as exc:  # noqa: BLE001 - the item's exception is the map's outcome
            named = None
            if isinstance(exc, pickle.PicklingError):
                # A runner that pickles as it sends (Dask) names the job's
                # argument, the list of items: name the item instead.
                named = self._unpicklable(start, items, exc)
            self._failed(named or self._chunk_failure(exc, start, count))
        else:
            if not scope.cancel_called:
                self._finished(start, count, results, seconds, overhead)
        finally:
            self._settled(start)

    def _finished(self, start: int, count: int, results: list[Any], seconds: float, overhead: float) -> None:
        self.sizer.measured(count, seconds, overhead)
        self.finished[start] = results
        if not self.keep_all:
            self.arrival.append(start)

    def _settled(self, start: int) -> None:
        """The chunk runs no more: finished, failed, cancelled or dropped."""
        del self.running[start]
        if self.keep_all or start not in self.finished:
            self.window.release()
        self.changed.unpark_all()

    # --- lanes: a local context's chunks, two in flight per worker ---------------------

    async def _run_lane(self, lane: _Lane) -> None:
        try:
            with lane.scope:
                async with self.limiter:
                    runner = self.get_runner()
                    pool = _pool_of(runner)
                    assert pool is not None  # the default context is always a local one
                    lease = WorkerLease(pool, self.fn)
                    try:
                        await self._drive(lane, lease, runner)
                    finally:
                        with self.loop.CancelScope(shield=True):
                            await lease.close()
        finally:
            if lane in self.lanes:
                self.lanes.remove(lane)
            while lane.sent:  # lost with a killed worker, or dropped by close
                self._settled(lane.sent.popleft().start)
            self.changed.unpark_all()

    def _may_go_ahead(self, lease: WorkerLease, chunk: _Chunk) -> bool:
        """Whether ``chunk`` may be queued behind the lane's running chunk."""
        return self.sizer.expected_seconds(chunk.count) <= AHEAD_SECONDS and lease.can_send_ahead(chunk.job)

    async def _drive(self, lane: _Lane, lease: WorkerLease, runner: Runner) -> None:
        """Send the ready chunks to the lane's worker, up to `IN_FLIGHT` at
        once, and settle their replies in order, until no chunk is ready and
        none is in flight (then the lane ends: its token and worker are free
        for other calls while the map waits for its caller)."""
        loop = self.loop
        shield = not self.kill_on_cancel
        began = 0.0  # when the oldest chunk in flight started, as far as this side knows
        sent = lane.sent
        ready = self.ready  # changed in place only
        while True:
            while ready and (not sent or (len(sent) < IN_FLIGHT and self._may_go_ahead(lease, ready[0]))):
                # A chunk not sent yet waits, as one waiting for a token does:
                # cancellation drops it (sends and replies are shielded).
                await loop.checkpoint_if_cancelled()
                chunk = ready.popleft()
                if not sent:
                    began = time.perf_counter()
                sent.append(chunk)
                try:
                    with loop.CancelScope(shield=shield):
                        await lease.send(chunk.job)
                except self.not_an_outcome:
                    raise
                except BaseException as exc:  # noqa: BLE001 - the chunk's outcome
                    # Nothing went out (a worker could not be taken or started).
                    sent.pop()
                    self._failed(self._chunk_failure(self._closed(exc, runner), chunk.start, chunk.count))
                    self._settled(chunk.start)
            if not sent:
                self.lanes.remove(lane)  # at once: the producer starts another lane for its next chunk
                return
            chunk = sent[0]
            if chunk.cancel_called and lease.drop_unsent():
                # Its worker died or left before reading it: it never ran, and
                # a failure before it says it never will.
                sent.popleft()
                self._settled(chunk.start)
                continue
            try:
                with loop.CancelScope(shield=shield):
                    result = await lease.receive()
                results, seconds = _checked_chunk(result.unwrap(), chunk.count)
                now = time.perf_counter()
                overhead = max(0.0, now - began - seconds)
                began = now  # the next chunk was queued: it started about now
            except self.not_an_outcome:
                raise
            except BaseException as exc:  # noqa: BLE001 - the item's exception is the map's outcome
                sent.popleft()
                began = time.perf_counter()
                self._failed(self._chunk_failure(self._closed(exc, runner), chunk.start, chunk.count))
            else:
                sent.popleft()
                if not chunk.cancel_called:
                    self._finished(chunk.start, chunk.count, results, seconds, overhead)
            self._settled(chunk.start)
            if self.kill_on_cancel and sent and all(queued.cancel_called for queued in sent):
                lane.scope.cancel()  # after a failure: kill what runs for nothing, as _failed does

    def _closed(self, exc: BaseException, runner: Runner) -> BaseException:
        """What a lane raises for its runner's PoolClosed: the call's error."""
        if isinstance(exc, runner._closed_error):
            return self.loop.ClosedResourceError(closed_while_waiting(runner._kind))  # type: ignore[no-any-return]
        return exc

    def _chunk_failure(self, exc: BaseException, start: int, count: int) -> _Failure:
        index = getattr(exc, "__dict__", {}).pop(ITEM_INDEX, None)
        fn = describe(self.fn)
        if type(index) is int and start <= index < start + count:  # as the worker said, if it can be
            _add_note(exc, f"raised by {fn} on item {index} of {self.name} (counting from 0)")
            return _Failure(exc, index, start)
        if count == 1:
            _add_note(exc, f"while {fn} ran on item {start} of {self.name} (counting from 0)")
        else:
            _add_note(exc, f"while {fn} ran on one of items {start} to {start + count - 1} of {self.name}, a chunk")
        return _Failure(exc, start, start)

    def _failed(self, failure: _Failure) -> None:
        """Keep the failure of the first item; stop what comes after it."""
        if self.failure is not None and self.failure.index <= failure.index:
            return
        self.failure = failure
        self.producer_scope.cancel()
        for start, scope in self.running.items():
            if start > failure.chunk_start:
                scope.cancel()
        if self.by_lanes:
            # Chunks of later items not sent yet never will be; a worker
            # that runs only such chunks is killed with kill_on_cancel.
            dropped = [chunk for chunk in self.ready if chunk.cancel_called]
            kept = [chunk for chunk in self.ready if not chunk.cancel_called]
            self.ready.clear()  # in place: a lane may be looking at it
            self.ready.extend(kept)
            for chunk in dropped:
                self._settled(chunk.start)
            if self.kill_on_cancel:
                for lane in self.lanes:
                    if lane.sent and all(chunk.cancel_called for chunk in lane.sent):
                        lane.scope.cancel()
        self.changed.unpark_all()

    # --- handing results over ---------------------------------------------------------

    def _idle(self) -> bool:
        return not self.producing and not self.running

    async def next_chunk(self) -> list[Any] | None:
        """The next chunk's results (None at the end), or raise the failure."""
        while True:
            failure = self.failure
            if self.ordered:
                results = self.finished.pop(self.next_start, None)
                if results is not None:
                    self.next_start += len(results)
                    self.window.release()
                    return results
                if failure is not None and self.next_start >= failure.chunk_start:
                    raise failure.error
            else:
                while self.arrival:
                    start = self.arrival.popleft()
                    results = self.finished.pop(start)
                    self.window.release()
                    if failure is None or start < failure.chunk_start:
                        return results
                if failure is not None and not any(start < failure.chunk_start for start in self.running):
                    raise failure.error
            if self._idle():
                if failure is not None:
                    raise failure.error
                return None
            await self.changed.park()

    def stop(self, nursery: Any) -> None:
        nursery.cancel_scope.cancel()


async def run_map(
    get_runner: Callable[[], Runner],
    fn: Callable[..., Any],
    iterables: tuple[Any, ...],
    chunksize: object,
    kill_on_cancel: bool,
    limiter: Any,
) -> list[Any]:
    """The body of every ``map`` (see the module's docstring)."""
    mapping = _Mapping(
        "map",
        get_runner,
        fn,
        iterables,
        ordered=False,
        keep_all=True,
        chunksize=chunksize,
        kill_on_cancel=kill_on_cancel,
        limiter=limiter,
    )
    loop = mapping.loop
    await loop.checkpoint_if_cancelled()
    async with loop.open_nursery() as nursery:
        nursery.start_soon(mapping.produce, nursery)
    if mapping.failure is not None:
        raise mapping.failure.error
    # chain() joins the chunks in C: a comprehension would cost the parent
    # tens of nanoseconds per item, which tiny items cannot afford.
    return list(itertools.chain.from_iterable(mapping.finished[start] for start in sorted(mapping.finished)))


class MapResults:
    """What ``imap`` returns: an async context manager whose value is an async
    iterator of the results (see `trio_parallel_fs.imap`)."""

    def __init__(self, mapping: _Mapping) -> None:
        self._mapping = mapping
        self._nursery_manager: Any = None
        self._nursery: Any = None
        self._chunk: Iterator[Any] = iter(())
        self._entered = False

    async def __aenter__(self) -> MapResults:
        if self._entered:
            raise RuntimeError("an imap's results can be entered once; call imap again for another run")
        self._entered = True
        loop = self._mapping.loop
        await loop.checkpoint_if_cancelled()
        self._nursery_manager = loop.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        self._nursery.start_soon(self._mapping.produce, self._nursery)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._nursery is not None
        # Whatever ended the block (the last result, a break, an exception),
        # nothing of the map outlives it: stop and wait for every chunk. The
        # block's own exception goes on as it is, not wrapped in the
        # nursery's exception group.
        self._mapping.stop(self._nursery)
        self._nursery = None
        await self._nursery_manager.__aexit__(None, None, None)

    def __aiter__(self) -> MapResults:
        return self

    async def __anext__(self) -> Any:
        # Within a chunk, no checkpoint: a tiny item costs less than one.
        for result in self._chunk:
            return result
        if self._nursery is None:
            raise RuntimeError("iterate over an imap's results inside its block: async with ctx.imap(...) as results")
        results = await self._mapping.next_chunk()
        if results is None:
            raise StopAsyncIteration
        self._chunk = iter(results)
        return next(self._chunk)


def open_map_results(
    get_runner: Callable[[], Runner],
    fn: Callable[..., Any],
    iterables: tuple[Any, ...],
    ordered: bool,
    chunksize: object,
    kill_on_cancel: bool,
    limiter: Any,
) -> MapResults:
    """The body of every ``imap``: checks now, runs in the ``async with`` block."""
    mapping = _Mapping(
        "imap",
        get_runner,
        fn,
        iterables,
        ordered=ordered,
        keep_all=False,
        chunksize=chunksize,
        kill_on_cancel=kill_on_cancel,
        limiter=limiter,
    )
    return MapResults(mapping)


class ContextMaps:
    """``map`` and ``imap`` for a context that is its own `Runner` (a local
    worker context, a Dask context): written once, each first asks the
    context whether it can run (``_check_usable``)."""

    def _check_usable(self) -> None:
        raise NotImplementedError

    async def map(
        self,
        sync_fn: Callable[..., T],
        *iterables: Iterable[Any],
        chunksize: int | None = None,
        kill_on_cancel: bool = False,
        limiter: Any = None,
    ) -> list[T]:
        """`trio_parallel_fs.map` on this context's workers: chunks of items
        as jobs, as many at once as the limiter has tokens. On a Dask context
        each chunk is one Dask task, sized from the items' measured time and
        each task's round trip, so that Dask's own cost per task stays small."""
        self._check_usable()
        runner = cast(Runner, self)  # what a subclass is, as well
        return await run_map(lambda: runner, sync_fn, iterables, chunksize, kill_on_cancel, limiter)

    def imap(
        self,
        sync_fn: Callable[..., Any],
        *iterables: Iterable[Any],
        ordered: bool = True,
        chunksize: int | None = None,
        kill_on_cancel: bool = False,
        limiter: Any = None,
    ) -> MapResults:
        """`trio_parallel_fs.imap` on this context's workers, in chunks as `map`."""
        self._check_usable()
        runner = cast(Runner, self)
        return open_map_results(lambda: runner, sync_fn, iterables, ordered, chunksize, kill_on_cancel, limiter)
