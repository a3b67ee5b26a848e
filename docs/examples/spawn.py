"""The spawn backend: each worker is a fresh interpreter, started by this process."""

import os

import jobs
import trio

import trio_parallel_fs


async def main():
    async with trio_parallel_fs.open_worker_context(
        worker_type=trio_parallel_fs.WorkerType.SPAWN, preload=["jobs"]
    ) as ctx:
        imported_in, worker = await ctx.run_sync(jobs.where_imported)
        print("template:", ctx.statistics().template_pid)
        print("jobs was imported by the worker itself:", imported_in == worker)
        print("the worker is our child:", await ctx.run_sync(os.getppid) == os.getpid())
        print("crunch(1000) =", await ctx.run_sync(jobs.crunch, 1000))


if __name__ == "__main__":
    trio.run(main)
