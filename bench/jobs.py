"""The functions the benchmarks run in workers.

This module imports only the standard library at import time, and numpy/scipy
inside the functions that need them: every system under test has to unpickle
these functions by reference in its workers, and a module that imported trio
(or anything heavy) would charge each fresh worker that import instead of
measuring the system. The template preloads it, as a user would preload their
own job module.
"""

from __future__ import annotations

import os
import time

# Arrays made once per worker by ``cached_array``, so that a "result" sample
# measures the transfer and not the allocation.
_arrays: dict[int, object] = {}


def trivial() -> int:
    return 1


def always() -> bool:
    """A retire hook for trio-parallel: leave after every job (single-use workers)."""
    return True


def numpy_scipy_job(seed: int = 0) -> float:
    """A small job that needs numpy and scipy (a 60x60 determinant through LAPACK)."""
    import numpy as np
    import scipy.linalg

    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((60, 60))
    return float(abs(scipy.linalg.det(matrix)) ** (1 / 60))


def numpy_scipy_pid(seed: int = 0, linger: float = 0.0) -> int:
    """The numpy/scipy job, then this worker's pid, for measuring its memory.

    ``linger`` keeps the worker busy a little, so that concurrent calls land on
    different workers.
    """
    numpy_scipy_job(seed)
    if linger:
        time.sleep(linger)
    return os.getpid()


def spin(loops: int) -> int:
    """Pure-Python CPU work that holds the GIL (so threads cannot scale)."""
    total = 0
    for i in range(loops):
        total += i * i
    return total


def nbytes(array: object) -> int:
    return int(array.nbytes)  # type: ignore[attr-defined]


def identity(value: object) -> object:
    """Return the argument: a round trip moves it to the worker and back."""
    return value


def cached_array(size: int) -> object:
    import numpy as np

    array = _arrays.get(size)
    if array is None:
        # np.ones touches every page, so the first transfer is not a page-fault benchmark.
        array = _arrays[size] = np.ones(size // 8, dtype=np.float64)
    return array


# --- items for the map benchmarks (one call per item) -------------------------------


def tiny_item(x: int) -> int:
    return x + 1


def busy_item(seconds: float) -> float:
    """Keep the CPU busy for ``seconds`` (wall time) and return it: an item of
    a parameter sweep whose cost is known."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return seconds


def array_total(array: object) -> float:
    return float(array.sum())  # type: ignore[attr-defined]
