"""Functions that tests/test_map.py runs in workers, item by item. They live in
a module (not in the test file) so that workers import them by reference."""

from __future__ import annotations

import os
import time


def square(x):
    return x * x


def fail_on(bad, x):
    """Raise for the items in ``bad``; the item otherwise."""
    if x in bad:
        raise ValueError(f"item {x} is bad")
    return x


def slow_fail_on(bad, slow, x):
    """Like `fail_on`, after sleeping ``slow[x]`` seconds where ``slow`` says."""
    time.sleep(slow.get(x, 0))
    return fail_on(bad, x)


def die_on(bad, x):
    """End the worker at once (exit code 3) on item ``bad``."""
    if x == bad:
        os._exit(3)
    return x


def sleep_then(seconds, x):
    time.sleep(seconds)
    return x


def pid_of(x):
    return os.getpid()


def total(array):
    return float(array.sum())


def double(array):
    return array * 2


def raise_unpicklable(x):
    """An exception that cannot travel back (it holds a lock): the parent gets
    a stand-in, without the item's index."""
    import threading

    error = ValueError(x)
    error.lock = threading.Lock()
    raise error


def fail_once_item_1_runs(directory, seconds, x):
    """Item 1 sleeps ``seconds``; item 0 waits until item 1 runs, then raises;
    the others return the item. Each item that runs first writes its worker's
    pid to the file ``directory/<item>``. So a failure meets a chunk of a
    later item running, and the files say which items ran."""
    record_start(directory, x)
    if x == 1:
        time.sleep(seconds)
    elif x == 0:
        deadline = time.monotonic() + 60  # a bound, should item 1 never run
        while not os.path.exists(os.path.join(directory, "1")) and time.monotonic() < deadline:
            time.sleep(0.005)
        raise ValueError("item 0 is bad")
    return x


def record_and_sleep(directory, seconds, x):
    """Write this worker's pid to ``directory/<x>``, then sleep ``seconds``."""
    record_start(directory, x)
    time.sleep(seconds)
    return x


def record_start(directory, x):
    path = os.path.join(directory, str(x))
    with open(path + ".tmp", "w") as file:
        file.write(str(os.getpid()))
    os.replace(path + ".tmp", path)  # whole, or not there at all


def count_run(directory, seconds, x):
    """Append a line to ``directory/<x>`` (so a file's lines say how many
    times the item ran), then sleep ``seconds``."""
    with open(os.path.join(directory, str(x)), "a") as file:
        file.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return x


def always():
    """A retire hook: every worker leaves after every job."""
    return True


def record_then_die_on(directory, bad, seconds, x):
    """Record the item's start, sleep ``seconds``, and end the worker on item ``bad``."""
    record_start(directory, x)
    time.sleep(seconds)
    return die_on(bad, x)


def array_of(x):
    """A result large enough for the shared memory area (1 MiB), full of ``x``."""
    import numpy as np

    return np.full(1 << 17, float(x))


def count_then_exit_cleanly_on(directory, bad, seconds, x):
    """`count_run`, then on item ``bad`` end the worker with exit code 0 (as
    a C library's exit(0) would), its next chunk unread in its socket."""
    count_run(directory, seconds, x)
    if x == bad:
        os._exit(0)
    return x


def lock_on(bad, x):
    """A result that cannot leave the worker (a lock) for the item ``bad``."""
    import threading

    return threading.Lock() if x == bad else x
