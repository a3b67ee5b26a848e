"""Preload the job module in the template, so that new workers start with it."""

import os

import jobs
import trio

import trio_parallel_fs


async def main():
    imported_in, worker = await trio_parallel_fs.run_sync(jobs.where_imported)
    stats = trio_parallel_fs.default_context_statistics()
    print("preloaded:", stats.preload)
    print("jobs was imported by the template:", imported_in == stats.template_pid)
    print("the job ran in another process:", worker not in (imported_in, os.getpid()))
    trio_loaded = await trio_parallel_fs.run_sync(jobs.is_loaded, "trio")
    print("trio is loaded in the worker:", trio_loaded)


if __name__ == "__main__":
    # Configure the default context once, before the first run_sync.
    trio_parallel_fs.configure_default_context(preload=["jobs"])
    trio.run(main)
