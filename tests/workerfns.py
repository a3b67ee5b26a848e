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


def imported(name):
    return name in sys.modules


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


# --- helpers for test_faults, test_bad_input, test_stress -------------------------


def record_pid_and_sleep(path, seconds, value=None):
    """Write this worker's pid to ``path`` (atomically), then sleep."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, path)
    time.sleep(seconds)
    return value


def tagged(i, seconds=0.0):
    """A result that only job ``i`` can produce, and the pid that produced it."""
    if seconds:
        time.sleep(seconds)
    return ("tagged", i, i * i + 7, os.getpid())


def pattern(size):
    """``size`` bytes (a bytearray) of a position-dependent pattern: byte i is
    i % 251, a prime period, so that misplaced chunks show up. Built in place,
    with one allocation."""
    data = bytearray(size)
    unit = bytes(range(251))[:size]
    data[: len(unit)] = unit
    filled = len(unit)
    while filled < size:
        count = min(filled - filled % 251, size - filled)
        data[filled : filled + count] = data[:count]
        filled += count
    return data


def length_and_crc(data):
    import zlib

    return len(data), zlib.crc32(data)


def nested_list(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


def depth_of(value):
    depth = 0
    while value:
        (value,) = value
        depth += 1
    return depth


def _rebuild_only_in(pid, cls, args):
    if os.getpid() != pid:
        raise ImportError(f"{cls.__name__} can only be rebuilt in process {pid}")
    return cls(*args)


class WorkerOnlyError(Exception):
    """Pickles in the worker and loads there, but cannot be loaded in the parent
    (like an exception from a module only the worker can import)."""

    def __reduce__(self):
        return _rebuild_only_in, (os.getpid(), type(self), self.args)


class WorkerOnlyValue:
    def __reduce__(self):
        return _rebuild_only_in, (os.getpid(), type(self), ())


def raise_worker_only_error():
    raise WorkerOnlyError("from a module the parent cannot import")


def return_worker_only_value():
    return WorkerOnlyValue()


def _explode(message):
    raise ValueError(message)


class ExplodesWhenLoaded:
    """Pickles fine anywhere; unpickling it raises ValueError."""

    def __reduce__(self):
        return _explode, ("this object refuses to be unpickled",)


class UnpicklableAndUnprintable(Exception):
    def __init__(self):
        import threading

        super().__init__("unprintable")
        self.lock = threading.Lock()

    def __str__(self):
        raise RuntimeError("__str__ fails on purpose")


def raise_unpicklable_and_unprintable():
    raise UnpicklableAndUnprintable()


def raise_with_unpicklable_args():
    import threading

    raise ValueError("has a lock in its args", threading.Lock())


def allocate_too_much():
    return bytearray(2**62)


def raise_system_exit(code):
    raise SystemExit(code)


def raise_keyboard_interrupt():
    raise KeyboardInterrupt("raised by the job")


def recurse_forever(n=0):
    return recurse_forever(n + 1)


def read_text(path: str) -> str:
    with open(path) as file:
        return file.read()


def platform_as_seen():
    """What this worker's code sees of its platform (under a platform view, the
    view's: see tests/platform_view): the platform, and whether fcntl imports."""
    try:
        import fcntl  # noqa: F401
    except ImportError:
        return sys.platform, False
    return sys.platform, True


def sleep_then_exit(seconds: float, code: int) -> None:
    """Sleep, then end the worker with ``code`` (no cleanup)."""
    time.sleep(seconds)
    os._exit(code)
