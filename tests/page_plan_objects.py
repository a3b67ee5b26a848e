"""Preloaded by a template in tests/test_page_plan.py: objects whose refcounts a
job writes to (copy-on-write in a forked worker), and the job."""

from __future__ import annotations

# About 8 MB of small objects on the template's heap.
OBJECTS = [float(n) for n in range(200_000)]


def minor_faults() -> int:
    with open("/proc/self/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[7])


def walk_objects() -> tuple[float, int]:
    """Sum the objects (every refcount is written: their pages are copied);
    return the sum and the minor faults this call took."""
    before = minor_faults()
    total = sum(OBJECTS)
    return total, minor_faults() - before
