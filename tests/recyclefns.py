"""Jobs for the recycling tests: they leak, hog and report memory."""

from __future__ import annotations

import os
import time

LEAKED: list[bytes] = []


def leak(megabytes: int) -> int:
    """Keep ``megabytes`` of written (so resident) memory alive in this worker."""
    LEAKED.append(b"\x01" * (megabytes * 2**20))
    return os.getpid()


def hog(megabytes: int, seconds: float) -> None:
    """Grow by 10 MB steps to ``megabytes``, then hold it: a runaway job."""
    held = []
    for _ in range(megabytes // 10):
        held.append(b"\x01" * (10 * 2**20))
        time.sleep(0.005)
    time.sleep(seconds)


def numpy_scipy_job() -> int:
    import numpy as np
    import scipy.linalg

    matrix = np.random.default_rng(0).standard_normal((100, 100))
    scipy.linalg.det(matrix)
    return os.getpid()
