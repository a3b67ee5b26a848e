"""An asyncio TCP server that runs a SciPy job in a worker for each request.

A request is one line, ``<size> <seed>``; the answer is the log-determinant
of that random matrix, or ``timeout`` if the job takes longer than the
server allows (its worker is killed then). The script starts the server,
sends it a few requests as clients would, and stops.
"""

import asyncio
import functools
import sys

import jobs

import trio_parallel_fs as tpf

TIMEOUT = 2.0  # seconds a request may take


async def handle(reader, writer, ctx):
    size, seed = map(int, (await reader.readline()).split())
    # kill_on_cancel: a request past its time stops its job, not just our wait.
    if size > 0:
        call = ctx.run_sync(jobs.log_det, size, seed, kill_on_cancel=True)
    else:  # a job that would take a minute
        call = ctx.run_sync(jobs.sleep_and_return, 60, None, kill_on_cancel=True)
    try:
        value = await asyncio.wait_for(call, TIMEOUT)
        answer = f"{value:.6f}"
    except TimeoutError:
        answer = "timeout"
    writer.write(f"{answer}\n".encode())
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def request(port, size, seed):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{size} {seed}\n".encode())
    await writer.drain()
    answer = (await reader.readline()).decode().strip()
    writer.close()
    await writer.wait_closed()
    return answer


async def main():
    # The template imports numpy and scipy once; each worker is forked from it.
    async with tpf.open_worker_context(preload=["numpy", "scipy.linalg", "jobs"]) as ctx:
        server = await asyncio.start_server(functools.partial(handle, ctx=ctx), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            answers = await asyncio.gather(*(request(port, 300, seed) for seed in range(4)))
            print("answers:", answers)
            # Many jobs in one call: map sends them to the workers in chunks.
            by_map = await ctx.map(jobs.log_det, [300] * 4, range(4))
            print("the same by one map:", [f"{value:.6f}" for value in by_map] == answers)
            print("a job past its time:", await request(port, 0, 0))
        print("retired:", ctx.statistics().retired)
    print("trio imported:", "trio" in sys.modules)


if __name__ == "__main__":
    asyncio.run(main())
