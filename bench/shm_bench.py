"""Large buffers between two processes: the reused shared area against the alternatives.

Run from the repository root::

    python -m bench.shm_bench            # 1 MB, 16 MB, 128 MB, 1 GB; about a minute
    python -m bench.shm_bench --quick    # 1 MB and 16 MB only
    python -m bench.shm_bench --sizes 64 --reps 9

Each size is sent both ways between this process and a second one, by four means,
interleaved rep by rep so that a noisy neighbour hits them all alike:

* area: the reused, pre-touched shared memory area (``SharedArea``). Argument:
  copy in, send the descriptor, the peer makes views (no copy). Result: the
  peer copies in, this side gets it lent from the area (``lend``: no copy out).
* fresh memfd: a new memfd per message, its fd sent by SCM_RIGHTS. Argument:
  create, copy in, send. Result: the peer creates and fills it, this side maps
  it (MAP_POPULATE) and keeps it: no copy out, but every page is new.
* socket: the bytes over a socketpair, received into a new buffer.
* memcpy: one copy within this process into memory already touched (the floor).
* memcpy new: the same into a new numpy array each time, as a result needs
  (numpy asks for huge pages; the new pages cost as much as the copy, or more).

Every figure is bytes / median seconds, from sending until the reply is in
hand (a round trip: at 1 MB the reply's latency is a large share of it).
A second table shows what growing the area costs, by pre-touch method.
"""

from __future__ import annotations

import argparse
import mmap
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

from _trio_parallel_fs_worker import _shm

MB = 10**6
GB = 10**9
HEADER = struct.Struct("!cQQ")  # command, size, length of the payload that follows

# Commands, this side -> peer (replies: b"k" with an optional payload).
AREA_ARG = b"a"
AREA_RESULT = b"r"
FRESH_ARG = b"f"
FRESH_RESULT = b"g"
SOCKET_ARG = b"s"
SOCKET_RESULT = b"t"


def recv_exactly(sock: socket.socket, length: int) -> bytearray:
    buffer = bytearray(length)
    view = memoryview(buffer)
    have = 0
    while have < length:
        count = sock.recv_into(view[have:])
        if count == 0:
            raise EOFError("the other end closed the socket")
        have += count
    return buffer


def send(
    sock: socket.socket, command: bytes, size: int = 0, payload: bytes = b"", fds: list[int] | None = None
) -> None:
    head = HEADER.pack(command, size, len(payload))
    if fds:
        socket.send_fds(sock, [head + payload], fds)
    else:
        sock.sendall(head + payload)


def receive(sock: socket.socket, with_fd: bool = False) -> tuple[bytes, int, bytearray, int | None]:
    fd = None
    if with_fd:
        data, fds, _, _ = socket.recv_fds(sock, HEADER.size, 1)
        fd = fds[0] if fds else None
        head = bytes(data) + bytes(recv_exactly(sock, HEADER.size - len(data)))
    else:
        head = bytes(recv_exactly(sock, HEADER.size))
    command, size, length = HEADER.unpack(head)
    payload = recv_exactly(sock, length)  # a large payload lands in a new buffer of its size
    return command, size, payload, fd


def fresh_memfd(size: int) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create("bench-fresh", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size)


# --- the peer: a second process ---------------------------------------------------------


def peer(area_fd: int, sock_fd: int, cap: int, largest: int) -> None:
    area = _shm.SharedArea.attach(area_fd, cap)
    sock = socket.socket(fileno=sock_fd)
    source = np.ones(largest, np.uint8)  # results come from here, touched in advance
    while True:
        try:
            command, size, payload, fd = receive(sock, with_fd=True)
        except EOFError:
            break
        if command == AREA_ARG:
            views = area.read(payload)
            del views  # a job would unpickle its arguments on them
            area.release()
            send(sock, b"k")
        elif command == AREA_RESULT:
            area.read(payload)  # no buffers: where this end may write its result
            area.release()
            send(sock, b"k", payload=area.write([source[:size]]))
        elif command == FRESH_ARG:
            assert fd is not None
            with mmap.mmap(fd, size) as segment:
                memoryview(segment).release()  # the job's view, made and let go
            os.close(fd)
            send(sock, b"k")
        elif command == FRESH_RESULT:
            new_fd, segment = fresh_memfd(size)
            with memoryview(segment) as view:
                view[:] = source[:size]
            segment.close()
            send(sock, b"k", fds=[new_fd])
            os.close(new_fd)
        elif command == SOCKET_ARG:
            recv_exactly(sock, size)
            send(sock, b"k")
        elif command == SOCKET_RESULT:
            sock.sendall(HEADER.pack(b"k", size, size))
            sock.sendall(source[:size])
    area.close()


# --- this side ------------------------------------------------------------------------


class Bench:
    def __init__(self, largest: int) -> None:
        self.area = _shm.SharedArea.create(cap=2 * largest + (64 << 20))
        self.sock, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.shm_bench", "--peer", str(self.area.fileno()), str(theirs.fileno())]
            + [str(self.area.cap), str(largest)],
            pass_fds=[self.area.fileno(), theirs.fileno()],
        )
        theirs.close()
        self.source = np.ones(largest, np.uint8)
        self.floor_target = np.zeros(largest, np.uint8)

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(timeout=60)
        self.area.close()

    def ack(self) -> bytearray:
        command, _, payload, _ = receive(self.sock)
        assert command == b"k", command
        return payload

    # Each returns what a caller would hold, so that freeing it is not timed.
    def area_arg(self, size: int) -> object:
        send(self.sock, AREA_ARG, size, self.area.write([self.source[:size]]))
        return self.ack()

    def area_result(self, size: int) -> object:
        send(self.sock, AREA_RESULT, size, self.area.write([]))
        return self.area.lend(self.ack())

    def fresh_arg(self, size: int) -> object:
        fd, segment = fresh_memfd(size)
        with memoryview(segment) as view:
            view[:] = self.source[:size]
        send(self.sock, FRESH_ARG, size, fds=[fd])
        os.close(fd)
        self.ack()
        return segment

    def fresh_result(self, size: int) -> object:
        send(self.sock, FRESH_RESULT, size)
        _, _, _, fd = receive(self.sock, with_fd=True)
        assert fd is not None
        segment = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        os.close(fd)
        return segment

    def socket_arg(self, size: int) -> object:
        self.sock.sendall(HEADER.pack(SOCKET_ARG, size, 0))
        self.sock.sendall(self.source[:size])
        return self.ack()

    def socket_result(self, size: int) -> object:
        send(self.sock, SOCKET_RESULT, size)
        return receive(self.sock)[2]

    def memcpy(self, size: int) -> object:
        np.copyto(self.floor_target[:size], self.source[:size])
        return None

    def memcpy_new(self, size: int) -> object:
        target = np.empty(size, np.uint8)
        np.copyto(target, self.source[:size])
        return target


def timed(fn: Callable[[int], object], size: int) -> float:
    start = time.perf_counter()
    held = fn(size)
    elapsed = time.perf_counter() - start
    del held
    return elapsed


def transfer_table(sizes: list[int], reps: int) -> list[str]:
    bench = Bench(max(sizes))
    means = {
        "area": (bench.area_arg, bench.area_result),
        "fresh memfd": (bench.fresh_arg, bench.fresh_result),
        "socket": (bench.socket_arg, bench.socket_result),
        "memcpy": (bench.memcpy, bench.memcpy),
        "memcpy new": (bench.memcpy_new, bench.memcpy_new),
    }
    lines = [f"{'size':>8} {'direction':>9} " + " ".join(f"{name:>12}" for name in means) + "   (GB/s)"]
    print(lines[0], flush=True)
    try:
        for size in sizes:
            for direction in (0, 1):
                samples: dict[str, list[float]] = {name: [] for name in means}
                for rep in range(reps + 1):
                    for name, fns in means.items():
                        seconds = timed(fns[direction], size)
                        if rep:  # the first round grows the area and warms everything up
                            samples[name].append(seconds)
                figures = [size / statistics.median(samples[name]) / GB for name in means]
                label = "argument" if direction == 0 else "result"
                lines.append(f"{size_label(size):>8} {label:>9} " + " ".join(f"{f:12.2f}" for f in figures))
                print(lines[-1], flush=True)
    finally:
        bench.close()
    return lines


def growth_table(size: int, reps: int) -> list[str]:
    """What growing the area to ``size`` costs: the writer allocates and maps
    new pages; the reader maps pages that exist already."""
    lines = [
        f"growing the area to {size_label(size)}, median of {reps}:",
        f"{'pre-touch':>14} {'writer ms':>10} {'reader ms':>10} {'then copy ms':>13}",
    ]
    print("\n".join(lines), flush=True)
    source = np.ones(size, np.uint8)
    for method in _shm.PREFAULT_METHODS:
        writer_ms, reader_ms, copy_ms = [], [], []
        for _ in range(reps):
            with _shm.SharedArea.create(size, prefault=method) as writer:
                start = time.perf_counter()
                writer._grow_to(size, writer=True)
                writer_ms.append((time.perf_counter() - start) * 1e3)
                with _shm.SharedArea.attach(os.dup(writer.fileno()), size, prefault=method) as reader:
                    start = time.perf_counter()
                    reader._grow_to(size, writer=False)
                    reader_ms.append((time.perf_counter() - start) * 1e3)
                    start = time.perf_counter()
                    reader.write([source])
                    copy_ms.append((time.perf_counter() - start) * 1e3)
        figures = [statistics.median(x) for x in (writer_ms, reader_ms, copy_ms)]
        lines.append(f"{method:>14} {figures[0]:10.1f} {figures[1]:10.1f} {figures[2]:13.1f}")
        print(lines[-1], flush=True)
    return lines


def size_label(size: int) -> str:
    return f"{size // GB} GB" if size >= GB else f"{size // MB} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shm_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", help="sizes in MB (default: 1 16 128 1000)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per size (default 5; 1 GB: 3)")
    parser.add_argument("--quick", action="store_true", help="1 MB and 16 MB only")
    parser.add_argument("--peer", nargs=4, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer:
        peer(*args.peer)
        return 0
    reason = _shm.unsupported_reason()
    if reason is not None or not hasattr(os, "memfd_create"):
        print(f"no memfd here ({reason or sys.platform}): nothing to compare", file=sys.stderr)
        return 1
    sizes = [s * MB for s in (args.sizes or ([1, 16] if args.quick else [1, 16, 128, 1000]))]
    print(f"python {sys.version.split()[0]}, {os.uname().sysname} {os.uname().release}, {os.cpu_count()} CPUs")
    small = [s for s in sizes if s < GB]
    large = [s for s in sizes if s >= GB]
    if small:
        transfer_table(small, args.reps)
    if large:
        transfer_table(large, min(args.reps, 3))
    print()
    growth_table(128 * MB, 3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
