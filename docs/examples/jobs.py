"""Job functions for the examples: a module that workers import, and that the
template can preload.

It imports only the standard library. It never imports trio: a worker that has
to import this module should not pay for Trio too.
"""

import os
import signal
import sys
import time

# Which process imported this module. In a preloaded template that is the
# template itself, and every worker forked from it inherits the module.
IMPORTED_IN = os.getpid()


def crunch(n):
    """Sum of the squares below n: pure Python, so it holds the GIL."""
    return sum(i * i for i in range(n))


def where_imported():
    """The pid that imported this module, and the pid running this job."""
    return IMPORTED_IN, os.getpid()


def is_loaded(name):
    return name in sys.modules


# Module-level state lives as long as the worker does.
HOARD = []


def leak(megabytes):
    """Keep a block of memory forever, as a leaky job would."""
    HOARD.append(bytearray(megabytes * 2**20))
    return len(HOARD)


def runaway(step_megabytes):
    """Allocate without end, one block at a time."""
    while True:
        HOARD.append(bytearray(step_megabytes * 2**20))
        time.sleep(0.01)


def sleep_and_return(seconds, value):
    time.sleep(seconds)
    return value


def get_oom_killed():
    """Die the way the kernel's OOM killer ends a process: by SIGKILL."""
    os.kill(os.getpid(), signal.SIGKILL)


# Per-worker state for the init and retire hooks.
WORKER = {}


def open_cache():
    """init hook: runs once in each new worker, before its first job."""
    WORKER["cache"] = {}


def cached_square(n):
    cache = WORKER["cache"]
    if n not in cache:
        cache[n] = n * n
    return cache[n]


def cache_is_full():
    """retire hook: runs after each job; True retires the worker."""
    return len(WORKER["cache"]) >= 3


def connect_to_database():
    """An init hook that fails."""
    raise ConnectionError("no database at db.invalid:5432")


def memory_figures():
    """This worker's memory in MiB: (USS, PSS, RSS); PSS is None off Linux."""
    import psutil

    info = psutil.Process().memory_full_info()
    pss = getattr(info, "pss", None)  # Linux only
    return round(info.uss / 2**20), None if pss is None else round(pss / 2**20), round(info.rss / 2**20)


def log_det(size, seed):
    """The log-determinant of a random ``size`` x ``size`` matrix (SciPy's LU):
    numpy and scipy are imported here, where the job runs; a template that
    preloads them has them already."""
    import numpy as np
    import scipy.linalg

    matrix = np.random.default_rng(seed).standard_normal((size, size))
    lu, _ = scipy.linalg.lu_factor(matrix)
    return float(np.sum(np.log(np.abs(np.diag(lu)))))
