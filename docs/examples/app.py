"""An application module: Trio code and a job function side by side.

Importing it imports trio. A worker that unpickles ``app.checksum`` must import
this module first, and so Trio too, unless the template preloaded it.
"""

import trio

import trio_parallel_fs


def checksum(data):
    return sum(data) % 255


async def handle(data):
    return await trio_parallel_fs.run_sync(checksum, data)


if __name__ == "__main__":
    print(trio.run(handle, b"hello"))
