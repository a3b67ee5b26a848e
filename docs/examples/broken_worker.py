"""A worker that dies mid-job: BrokenWorkerError, and the context carries on."""

import jobs
import trio

import trio_parallel_fs


async def main():
    async with trio_parallel_fs.open_worker_context() as ctx:
        try:
            await ctx.run_sync(jobs.get_oom_killed)
        except trio_parallel_fs.BrokenWorkerError as exc:
            print("BrokenWorkerError:", exc)
            print("signal_name:", exc.signal_name)
            print("exitcode:", exc.exitcode)
            print("function:", exc.function)
            print("template_died:", exc.template_died)
        # The dead worker is gone; the next call gets a new one.
        print("next call:", await ctx.run_sync(jobs.crunch, 1000))
        print("retired:", ctx.statistics().retired)


if __name__ == "__main__":
    trio.run(main)
