"""Parameter sweeps: many small evaluations with map and imap."""

import functools
import itertools
import math

import trio

import trio_parallel_fs


def model(rate, size):
    """One evaluation of a parameter sweep: microseconds of pure Python."""
    return round(size * (1 - math.exp(-rate)), 6)


def checked(x):
    if x == 1234:
        raise ValueError(f"no solution for x={x}")
    return x


async def main():
    # map: results in input order; several iterables are zipped as the builtin map does.
    rates = [0.5, 1.0, 2.0]
    print("map:", await trio_parallel_fs.map(model, rates, [10, 10, 10]))

    # 100,000 evaluations: the items go to the workers in chunks, one job each.
    sweep = await trio_parallel_fs.map(functools.partial(model, 0.1), range(100_000))
    print("evaluations:", len(sweep), "last:", sweep[-1])

    # imap: results as they come, the input read lazily (here an endless one).
    done = 0
    async with trio_parallel_fs.imap(functools.partial(model, 0.1), itertools.count()) as results:
        async for result in results:
            done += 1
            if result > 10_000:
                break  # leaving the block stops the map
    print("imap stopped after", done, "results")
    print("running workers now:", trio_parallel_fs.default_context_statistics().running_workers)

    # The first failing item's exception, with a note that names the item.
    try:
        await trio_parallel_fs.map(checked, range(5000))
    except ValueError as exc:
        print("error:", exc)
        print("note:", exc.__notes__[0])


if __name__ == "__main__":
    trio.run(main)
