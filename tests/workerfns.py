"""Functions that tests run inside workers. They live in a module (not in the
test files) so that workers import them by reference, like user code would."""

from __future__ import annotations

import gc
import os
import signal
import sys
import time


def add(a, b):
    return a + b


def pid():
    return os.getpid()


def parent_pid():
    return os.getppid()


def sleep_and_return(seconds, value=None):
    time.sleep(seconds)
    return value


def busy_python(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def raise_value_error(message):
    raise ValueError(message)


def exit_with(code):
    sys.stdout.flush()
    os._exit(code)


def kill_self(signum):
    os.kill(os.getpid(), signum)
    time.sleep(10)


def modules_loaded(*names):
    return {name: name in sys.modules for name in names}


def sigint_handler_is_ignored():
    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def gc_freeze_count():
    return gc.get_freeze_count()


def environment(name):
    return os.environ.get(name)


def thread_count():
    return len(os.listdir("/proc/self/task"))


def allocate_and_hold(megabytes, seconds):
    block = bytearray(megabytes * 2**20)  # zero pages; touch them so they count
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    time.sleep(seconds)
    return len(block)


class NeedsTwoArgs(Exception):
    def __init__(self, first, second):
        super().__init__(f"{first} and {second}")
        self.first = first
        self.second = second


def raise_needs_two_args():
    raise NeedsTwoArgs("a", "b")


class HoldsALock(Exception):
    def __init__(self):
        import threading

        super().__init__("holds a lock")
        self.lock = threading.Lock()


def raise_holds_a_lock():
    raise HoldsALock()


def return_unpicklable():
    import threading

    return threading.Lock()


def generator_in_disguise():
    return (i for i in range(3))


def preload_marker_pid():
    import preload_marker

    return preload_marker.IMPORTED_IN


STATE = {"calls": 0}


def count_calls():
    STATE["calls"] += 1
    return STATE["calls"]


def init_raises():
    raise RuntimeError("init failed on purpose")


def retire_raises():
    raise KeyError("retire failed on purpose")
