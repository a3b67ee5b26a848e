"""One chunk of a ``map``: the job that runs a function over consecutive items.

The parent (``trio_parallel_fs._map``) sends ``run_chunk`` with the function
and the items as an ordinary job, so a chunk takes every path a job takes (the
shared memory area for large arrays among them). It returns the results and
the seconds the items took here, which the parent sizes later chunks by.

Standard library only, and no trio: on a Dask cluster this module travels by
value (``trio_parallel_fs.dask`` sends a copy of ``run_chunk``), so that workers need nothing
of ours installed.
"""

from __future__ import annotations

import itertools
import operator
import time
from collections.abc import Callable, Sequence
from typing import Any

#: The attribute a failing item's exception carries back to the parent: the
#: item's index in the whole map. The parent removes it and says it in a note.
ITEM_INDEX = "_trio_parallel_fs_map_item"


def run_chunk(fn: Callable[..., Any], start: int, items: Sequence[Any], star: bool) -> tuple[list[Any], float]:
    """``[fn(item) for item in items]`` (``fn(*item)`` with ``star``: zipped
    iterables), and the seconds it took.

    ``start`` is the index of the first item in the whole map. The first item
    that raises stops the chunk; its exception goes back as the job's, with the
    item's index as its `ITEM_INDEX` attribute.
    """
    began = time.perf_counter()
    rest = iter(items)
    try:
        # map() and starmap() run the loop in C: a Python loop would cost a
        # tenth of a microsecond per item, which tiny items cannot afford.
        results = list(itertools.starmap(fn, rest) if star else map(fn, rest))
    except BaseException as exc:
        # The failing item is the last one taken from ``rest``, and a list's
        # iterator knows how many are left.
        failed = start + len(items) - operator.length_hint(rest) - 1
        try:
            setattr(exc, ITEM_INDEX, failed)
        except Exception:  # noqa: BLE001 - an exception without a __dict__: the parent names the chunk instead
            pass
        raise
    return results, time.perf_counter() - began
