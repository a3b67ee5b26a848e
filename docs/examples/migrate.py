"""trio-parallel code that runs unchanged on trio_parallel_fs.

Run ``python migrate.py`` for trio_parallel_fs, or ``python migrate.py
trio_parallel`` for trio-parallel 1.3.0 itself: the output is the same.
"""

import sys

import jobs
import trio

if sys.argv[1:] == ["trio_parallel"]:
    import trio_parallel
else:
    import trio_parallel_fs as trio_parallel  # the only line that changes


async def main():
    limiter = trio_parallel.current_default_worker_limiter()
    print("default limiter is a CapacityLimiter:", isinstance(limiter, trio.CapacityLimiter))

    print("run_sync:", await trio_parallel.run_sync(jobs.crunch, 1000))
    one = trio.CapacityLimiter(1)
    print("with a limiter:", await trio_parallel.run_sync(jobs.crunch, 10, limiter=one))

    with trio.move_on_after(0.5) as scope:
        await trio_parallel.run_sync(jobs.sleep_and_return, 30, None, cancellable=True)
    print("cancellable=True cancelled:", scope.cancelled_caught)
    with trio.move_on_after(0.5) as scope:
        await trio_parallel.run_sync(jobs.sleep_and_return, 30, None, kill_on_cancel=True)
    print("kill_on_cancel=True cancelled:", scope.cancelled_caught)

    try:
        await trio_parallel.run_sync(jobs.get_oom_killed)
    except trio_parallel.BrokenWorkerError:
        print("BrokenWorkerError caught")

    stats = trio_parallel.default_context_statistics()
    print("default context running workers:", stats.running_workers)

    async with trio_parallel.open_worker_context(
        idle_timeout=60,
        init=jobs.open_cache,
        retire=jobs.cache_is_full,
        grace_period=10,
        worker_type=trio_parallel.WorkerType.SPAWN,
    ) as ctx:
        print("a WorkerContext:", isinstance(ctx, trio_parallel.WorkerContext))
        print("its idle_timeout:", ctx.idle_timeout)
        print("squares:", [await ctx.run_sync(jobs.cached_square, n) for n in range(1, 5)])
        print("its running workers:", ctx.statistics().running_workers)

    async with trio_parallel.cache_scope(idle_timeout=30):
        print("in a cache scope:", await trio_parallel.run_sync(jobs.crunch, 100))


if __name__ == "__main__":
    # Before the first run_sync: settings for the default context.
    trio_parallel.configure_default_context(idle_timeout=120, grace_period=10)
    trio.run(main)
