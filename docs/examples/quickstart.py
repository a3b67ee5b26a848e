"""Quick start: run a CPU-bound function in worker processes, from Trio."""

import trio

import trio_parallel_fs


def crunch(n):
    """Sum of the squares below n: pure Python, so it holds the GIL."""
    return sum(i * i for i in range(n))


async def main():
    # One call: crunch and its argument go to a worker; the result comes back.
    print("crunch(1000) =", await trio_parallel_fs.run_sync(crunch, 1000))

    # Many calls at once: up to one worker per CPU runs them in parallel.
    sizes = [10**3, 10**4, 10**5, 10**6]
    results = {}

    async def run_one(n):
        results[n] = await trio_parallel_fs.run_sync(crunch, n)

    async with trio.open_nursery() as nursery:
        for n in sizes:
            nursery.start_soon(run_one, n)
    print("results:", [results[n] for n in sizes])

    limiter = trio_parallel_fs.current_default_worker_limiter()
    stats = trio_parallel_fs.default_context_statistics()
    print("CPU slots:", limiter.total_tokens)
    print("workers started:", stats.started_workers)
    print("idle workers:", stats.idle_workers)


if __name__ == "__main__":
    trio.run(main)
