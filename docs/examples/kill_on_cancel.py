"""Cancellation: shielded by default, or kill the worker with kill_on_cancel."""

import time

import jobs
import trio

import trio_parallel_fs


async def main():
    async with trio_parallel_fs.open_worker_context() as ctx:
        # By default a job that has started runs to the end, and its result
        # comes back. The cancellation takes effect at the next checkpoint.
        with trio.move_on_after(0.1) as scope:
            value = await ctx.run_sync(jobs.sleep_and_return, 0.5, "finished")
            print("shielded job returned:", value)
            await trio.lowlevel.checkpoint()  # Cancelled is raised here
            print("this line is not reached")
        print("cancelled at the next checkpoint:", scope.cancelled_caught)

        # With kill_on_cancel=True, cancellation kills the worker at once.
        start = time.monotonic()
        with trio.move_on_after(0.1) as scope:
            await ctx.run_sync(jobs.sleep_and_return, 30, "never", kill_on_cancel=True)
        print("killed job cancelled:", scope.cancelled_caught)
        print(f"seconds until the call returned: {time.monotonic() - start:.1f}")
        print("retired:", ctx.statistics().retired)


if __name__ == "__main__":
    trio.run(main)
