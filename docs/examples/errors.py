"""The errors run_sync raises, one by one, and what each one carries."""

import pickle
import threading

import jobs
import trio

import trio_parallel_fs

MiB = 2**20


def parse(text):
    return int(text)


async def job_exception():
    # The job's own exception arrives with its type and arguments. Its
    # __cause__ holds the traceback from the worker, as text.
    try:
        await trio_parallel_fs.run_sync(parse, "forty-two")
    except ValueError as exc:
        print("ValueError:", exc)
        print("cause:", type(exc.__cause__).__name__)
        print("worker frame shown:", "in parse" in str(exc.__cause__))


async def unpicklable_argument():
    # Nothing is sent: the error names the argument that cannot travel.
    try:
        await trio_parallel_fs.run_sync(jobs.crunch, threading.Lock())
    except pickle.PicklingError as exc:
        print("PicklingError:", exc)


async def memory_ceiling():
    async with trio_parallel_fs.open_worker_context(memory_ceiling=100 * MiB) as ctx:
        try:
            await ctx.run_sync(jobs.runaway, 10)
        except trio_parallel_fs.MemoryCeilingError as exc:
            used, ceiling = exc.used // MiB, exc.ceiling // MiB
            print(f"MemoryCeilingError: used {used} MiB, ceiling {ceiling} MiB")
            print("signal_name:", exc.signal_name)
        print("retired:", ctx.statistics().retired)


async def init_hook_fails():
    async with trio_parallel_fs.open_worker_context(init=jobs.connect_to_database) as ctx:
        try:
            await ctx.run_sync(jobs.crunch, 1000)
        except trio_parallel_fs.WorkerHookError as exc:
            print("WorkerHookError: hook", repr(exc.hook))
            print("cause:", repr(exc.__cause__))


async def preload_fails():
    try:
        async with trio_parallel_fs.open_worker_context(preload=["jobs", "no_such_module"]):
            pass  # not reached: the template starts on entry
    except trio_parallel_fs.TemplateStartError as exc:
        print("TemplateStartError:", exc)
        print("cause:", repr(exc.__cause__))


async def main():
    await job_exception()
    await unpicklable_argument()
    await memory_ceiling()
    await init_hook_fails()
    await preload_fails()


if __name__ == "__main__":
    trio.run(main)
