"""Lifecycles as data: the states of a worker and of a context, and the only
transitions between them.

Theory of operation
-------------------
A worker is STARTING until its first job is sent (a worker prepared ahead of
demand waits in that state on the idle stack), then alternates between
BUSY (a job is out) and IDLE (on the pool's idle stack). It ends GONE (it left
by itself: idle timeout, or after a reply that said it retires) or DEAD
(crashed, killed, or its template died). RETIRING is the wait in between: it
said it is leaving, or its context closed its channel, and its exit has not
been seen yet. The pool applies events through `next_worker_state` (and a
context's through `next_context_state`), under its lock;
an event that the table does not list for the current state is a bug, and
raises `LifecycleError` instead of silently corrupting the pool.

A context is OPEN, then CLOSING (no new calls; jobs in flight finish), then
CLOSED.
"""

from __future__ import annotations

import enum


class LifecycleError(RuntimeError):
    """An event arrived in a state where it cannot happen."""


class WorkerState(enum.Enum):
    # Members are singletons: hash them by identity, in C. Enum's own __hash__
    # is Python code, run twice per call for the transition table's lookups.
    __hash__ = object.__hash__

    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    RETIRING = "retiring"
    GONE = "gone"
    DEAD = "dead"


class WorkerEvent(enum.Enum):
    __hash__ = object.__hash__  # see WorkerState

    SEND_JOB = "send job"  # the pool hands it a job
    REPLY = "reply"  # the job's outcome came back; it stays
    REPLY_RETIRING = "reply, retiring"  # the outcome came back, and it leaves (or init failed)
    LEFT = "left"  # it exited cleanly: Bye, idle timeout, or the exit after retiring
    DIED = "died"  # it exited otherwise, or could not be started
    KILL = "kill"  # the pool killed it (kill_on_cancel, or closing after the grace period)
    CLOSE = "close"  # its channel closed while it was idle (context closed, or unneeded)


W, E = WorkerState, WorkerEvent

WORKER_TRANSITIONS: dict[tuple[WorkerState, WorkerEvent], WorkerState] = {
    (W.STARTING, E.SEND_JOB): W.BUSY,
    (W.STARTING, E.LEFT): W.GONE,  # prepared ahead, it left by its idle timeout before any job
    (W.STARTING, E.DIED): W.DEAD,
    (W.STARTING, E.CLOSE): W.RETIRING,
    (W.STARTING, E.KILL): W.DEAD,  # the open that waited for its preload was cancelled
    (W.IDLE, E.SEND_JOB): W.BUSY,
    (W.IDLE, E.LEFT): W.GONE,
    (W.IDLE, E.DIED): W.DEAD,
    (W.IDLE, E.CLOSE): W.RETIRING,
    (W.BUSY, E.REPLY): W.IDLE,
    (W.BUSY, E.REPLY_RETIRING): W.RETIRING,
    (W.BUSY, E.LEFT): W.GONE,
    (W.BUSY, E.DIED): W.DEAD,
    (W.BUSY, E.KILL): W.DEAD,
    (W.RETIRING, E.LEFT): W.GONE,
    (W.RETIRING, E.DIED): W.DEAD,
    (W.RETIRING, E.KILL): W.DEAD,
}

FINAL_WORKER_STATES = frozenset({W.GONE, W.DEAD})


def next_worker_state(state: WorkerState, event: WorkerEvent) -> WorkerState:
    try:
        return WORKER_TRANSITIONS[state, event]
    except KeyError:
        raise LifecycleError(f"a worker cannot {event.value!r} while {state.value}") from None


class ContextState(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class ContextEvent(enum.Enum):
    CLOSE = "close"  # no new calls from now on
    CLOSED = "closed"  # its workers and template are gone


CONTEXT_TRANSITIONS: dict[tuple[ContextState, ContextEvent], ContextState] = {
    (ContextState.OPEN, ContextEvent.CLOSE): ContextState.CLOSING,
    (ContextState.CLOSING, ContextEvent.CLOSED): ContextState.CLOSED,
}


def next_context_state(state: ContextState, event: ContextEvent) -> ContextState:
    try:
        return CONTEXT_TRANSITIONS[state, event]
    except KeyError:
        raise LifecycleError(f"a context cannot {event.value!r} while {state.value}") from None
