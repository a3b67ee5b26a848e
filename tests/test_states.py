"""The lifecycle tables, without processes: every transition they list, and
that anything else raises."""

from __future__ import annotations

import itertools

import pytest

from trio_parallel_fs._pool.lifecycle import (
    CONTEXT_TRANSITIONS,
    FINAL_WORKER_STATES,
    WORKER_TRANSITIONS,
    ContextEvent,
    ContextState,
    LifecycleError,
    WorkerEvent,
    WorkerState,
    next_context_state,
    next_worker_state,
)

W, E = WorkerState, WorkerEvent


def test_a_worker_serves_then_leaves_or_dies():
    state = W.STARTING
    for event, expected in [
        (E.SEND_JOB, W.BUSY),
        (E.REPLY, W.IDLE),
        (E.SEND_JOB, W.BUSY),
        (E.REPLY_RETIRING, W.RETIRING),
        (E.LEFT, W.GONE),
    ]:
        state = next_worker_state(state, event)
        assert state is expected


@pytest.mark.parametrize(("state", "event"), sorted(WORKER_TRANSITIONS, key=str))
def test_every_listed_worker_transition_is_allowed(state, event):
    assert next_worker_state(state, event) is WORKER_TRANSITIONS[state, event]


@pytest.mark.parametrize(
    ("state", "event"),
    [pair for pair in itertools.product(WorkerState, WorkerEvent) if pair not in WORKER_TRANSITIONS],
)
def test_every_other_worker_transition_raises(state, event):
    with pytest.raises(LifecycleError, match=f"a worker cannot '{event.value}' while {state.value}"):
        next_worker_state(state, event)


def test_final_states_are_final_and_every_other_state_can_end():
    for state in FINAL_WORKER_STATES:
        assert not [event for (source, event) in WORKER_TRANSITIONS if source is state]
    for state in set(WorkerState) - FINAL_WORKER_STATES:
        reachable = {state}
        while True:
            more = {target for (source, _), target in WORKER_TRANSITIONS.items() if source in reachable}
            if more <= reachable:
                break
            reachable |= more
        assert reachable & FINAL_WORKER_STATES, state


def test_no_job_goes_to_a_worker_that_is_leaving():
    for state in (W.RETIRING, W.GONE, W.DEAD, W.BUSY):
        with pytest.raises(LifecycleError):
            next_worker_state(state, E.SEND_JOB)


def test_a_context_closes_once():
    state = next_context_state(ContextState.OPEN, ContextEvent.CLOSE)
    assert state is ContextState.CLOSING
    assert next_context_state(state, ContextEvent.CLOSED) is ContextState.CLOSED
    for state, event in itertools.product(ContextState, ContextEvent):
        if (state, event) not in CONTEXT_TRANSITIONS:
            with pytest.raises(LifecycleError, match="a context cannot"):
                next_context_state(state, event)
