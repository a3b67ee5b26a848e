"""A large read-only dataset, loaded once in the template and shared by every
worker: no job ever sends it.

This file is both the script and the module the workers use. The template
preloads it as ``bigdata`` (the script's folder is on ``sys.path``) and runs
``bigdata.load_dataset`` once. The script passes its functions as
``bigdata.<name>``, so that they travel by reference, not by value with their
globals. It imports trio only when it runs as the script, so that the
template and the workers stay Trio-free.
"""

import os

import numpy as np

from _trio_parallel_fs_worker._memory import memory_usage

MiB = 2**20
ROWS = COLUMNS = 4096  # 4096 x 4096 float64: 128 MiB

DATASET = None  # set in the template by load_dataset


def load_dataset():
    """Runs once, in the template: every worker is forked with DATASET in it."""
    global DATASET
    DATASET = np.arange(ROWS * COLUMNS, dtype=np.float64).reshape(ROWS, COLUMNS)
    DATASET.flags.writeable = False  # a write would copy the page into the worker


def total_and_memory(_job):
    """Read the whole dataset; report this worker's memory."""
    total = float(DATASET.sum())
    return os.getpid(), total, memory_usage("uss"), memory_usage("rss")


async def main():
    import bigdata  # this file, as the workers know it
    import trio

    import trio_parallel_fs

    async with trio_parallel_fs.open_worker_context(
        preload=["numpy", "bigdata"], template_init=bigdata.load_dataset
    ) as ctx:
        results = []

        async def one(job):
            results.append(await ctx.run_sync(bigdata.total_and_memory, job))

        async with trio.open_nursery() as nursery:
            for job in range(8):
                nursery.start_soon(one, job)

    n = ROWS * COLUMNS
    expected = n * (n - 1) / 2
    print(f"dataset: {n * 8 // MiB} MiB, loaded once in the template")
    print("every job saw the whole dataset:", all(total == expected for _, total, _, _ in results))
    last = {pid: (uss, rss) for pid, _, uss, rss in results}  # each worker's figures after its last job
    for uss, rss in last.values():
        print(f"a worker: USS {uss / MiB:.1f} MiB, RSS {rss / MiB:.0f} MiB")


if __name__ == "__main__":
    import trio

    trio.run(main)
