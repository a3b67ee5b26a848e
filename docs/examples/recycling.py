"""Recycling workers: by job count, by memory, by idle time, by a hook."""

import warnings

import jobs
import trio

import trio_parallel_fs

MiB = 2**20


async def by_job_count():
    async with trio_parallel_fs.open_worker_context(max_jobs=2) as ctx:
        for _ in range(6):
            await ctx.run_sync(jobs.crunch, 1000)
        stats = ctx.statistics()
    started, retired = stats.started_workers, stats.retired
    print(f"max_jobs=2, 6 jobs: workers started {started}, retired {retired}")


async def by_memory():
    # Each call keeps 20 MiB more in the worker. Past 50 MiB of private
    # memory (USS), the worker retires after sending its result.
    async with trio_parallel_fs.open_worker_context(
        preload=["jobs"], max_memory=50 * MiB
    ) as ctx:
        blocks = [await ctx.run_sync(jobs.leak, 20) for _ in range(6)]
        stats = ctx.statistics()
    print("blocks held after each call:", blocks)
    started, retired = stats.started_workers, stats.retired
    print(f"max_memory=50 MiB: workers started {started}, retired {retired}")


async def rss_counts_shared_pages():
    # The template holds a 64 MiB table. Every worker shares it, so it shows
    # in each worker's RSS, but not in its USS.
    # With RSS, a fresh worker is already above the limit: the context warns
    # (once) that every worker will retire after every job.
    for metric in ["uss", "rss"]:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            async with trio_parallel_fs.open_worker_context(
                preload=["jobs", "bigtable"], max_memory=40 * MiB, memory_metric=metric
            ) as ctx:
                for _ in range(4):
                    uss, pss, rss = await ctx.run_sync(jobs.memory_figures)
                stats = ctx.statistics()
        pss_text = "n/a (Linux only)" if pss is None else f"{pss} MiB"
        print(f"memory_metric={metric!r}: USS {uss} MiB, PSS {pss_text}, RSS {rss} MiB")
        started, retired = stats.started_workers, stats.retired
        print(f"  4 jobs: workers started {started}, retired {retired}")
        for warning in warned:
            print(f"  warning: {str(warning.message).split(':')[0]}")


async def by_idle_time():
    async with trio_parallel_fs.open_worker_context(idle_timeout=0.2) as ctx:
        await ctx.run_sync(jobs.crunch, 1000)
        await trio.sleep(1)
        stats = ctx.statistics()
    idle, retired = stats.idle_workers, stats.retired
    print(f"idle_timeout=0.2: idle workers {idle}, retired {retired}")


async def by_hooks():
    # init fills in per-worker state; retire decides after each job.
    async with trio_parallel_fs.open_worker_context(
        init=jobs.open_cache, retire=jobs.cache_is_full
    ) as ctx:
        squares = [await ctx.run_sync(jobs.cached_square, n) for n in range(1, 7)]
        stats = ctx.statistics()
    print("squares:", squares)
    started, retired = stats.started_workers, stats.retired
    print(f"retire hook: workers started {started}, retired {retired}")


async def main():
    await by_job_count()
    await by_memory()
    await rss_counts_shared_pages()
    await by_idle_time()
    await by_hooks()


if __name__ == "__main__":
    trio.run(main)
