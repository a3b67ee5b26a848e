"""What a fresh worker pays when the job's module imports trio."""

import time

import app
import trio

import trio_parallel_fs


async def first_call_ms(**config):
    """Milliseconds for the first call of a new context: a fresh worker."""
    async with trio_parallel_fs.open_worker_context(**config) as ctx:
        start = time.perf_counter()
        await ctx.run_sync(app.checksum, b"hello")
        return (time.perf_counter() - start) * 1000


async def main():
    # The best of three runs each, to see past noise from other processes.
    cold = min([await first_call_ms() for _ in range(3)])
    warm = min([await first_call_ms(preload=["app"]) for _ in range(3)])
    print(f"fresh worker, app not preloaded: {cold:.1f} ms")
    print(f"fresh worker, app preloaded: {warm:.1f} ms")


if __name__ == "__main__":
    trio.run(main)
