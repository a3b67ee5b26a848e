"""The portable channel for spawned workers: loopback TCP, a one-time secret, the stdin lifeline.

These run real worker processes on the channel (the worker loop, ``serve``,
behind ``connect_to_parent``) and real strangers connecting to the listener.
They need nothing Linux-only: the same file runs on macOS and Windows.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import textwrap

import cloudpickle
import psutil
import pytest
import trio
import workerfns
from conftest import is_dead

import _trio_parallel_fs_worker
import trio_parallel_fs as tpf
from _trio_parallel_fs_worker import _loopback as child_loopback
from _trio_parallel_fs_worker import protocol as p
from _trio_parallel_fs_worker._settings import WorkerSettings
from _trio_parallel_fs_worker.codec import dumps_job
from trio_parallel_fs import BrokenWorkerError
from trio_parallel_fs._backends.spawn import loopback
from trio_parallel_fs._config import WorkerConfig

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(_trio_parallel_fs_worker.__file__)))
HANG = 30

# What the spawn backend will run once it uses this channel: a worker that
# connects back on the port it is given, then serves jobs.
WORKER_BOOT = (
    f"import sys; sys.path.insert(0, {ROOT!r}); "
    "from _trio_parallel_fs_worker._lifeline import ignore_interrupts; ignore_interrupts(); "
    "from _trio_parallel_fs_worker._loopback import connect_to_parent; "
    "from _trio_parallel_fs_worker._worker import serve_then_leave; "
    "serve_then_leave(connect_to_parent(int(sys.argv[1])).detach())"
)


def worker_command(port: int) -> list[str]:
    return [sys.executable, "-c", WORKER_BOOT, str(port)]


def launch_worker(listener: loopback.LoopbackListener) -> subprocess.Popen[bytes]:
    """Start a worker for ``listener`` by hand and give it the secret."""
    popen = subprocess.Popen(worker_command(listener.port), stdin=subprocess.PIPE, **loopback.new_process_options())
    loopback.hand_over_secret(popen, listener.secret)
    return popen


SETTINGS = WorkerSettings(
    cwd=os.getcwd(),
    sys_path=list(sys.path),
    preload=(),
    template_init=None,
    hooks=cloudpickle.dumps(WorkerConfig(worker_type="spawn").worker_hooks()),
)


class JobDriver:
    """The parent's end of a worker channel, blocking: the sans-IO connection
    over the socket, with a receive timeout so that a hang fails the test."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(HANG)
        self.sock = sock
        self.connection = p.Connection(p.PARENT)
        self.configured = False

    def send_job(self, fn, *args) -> None:
        parts: list[bytes | memoryview] = []
        if not self.configured:
            parts += self.connection.send(p.Config(SETTINGS))
            self.configured = True
        parts += self.connection.send(p.Job(*dumps_job(fn, args)))
        for part in parts:
            self.sock.sendall(part)

    def receive(self) -> p.Event:
        while True:
            event = self.connection.next_event()
            if event is not p.NEED_DATA:
                return event  # type: ignore[return-value]
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:  # how a dead peer's end often closes on Windows
                data = b""
            self.connection.receive_data(data)

    def run(self, fn, *args):
        """Run one job; return its result."""
        self.send_job(fn, *args)
        event = self.receive()
        while isinstance(event, p.Started):  # after an init hook; none here, but allowed
            event = self.receive()
        assert isinstance(event, p.Value), f"expected a Value, got {event!r}"
        return pickle.loads(event.pickled, buffers=event.buffers)


async def run_job(driver: JobDriver, fn, *args):
    with trio.fail_after(HANG):
        return await trio.to_thread.run_sync(lambda: driver.run(fn, *args))


async def start_worker(**kwargs) -> loopback.LoopbackWorker:
    with trio.fail_after(HANG):
        return await trio.to_thread.run_sync(lambda: loopback.start_loopback_worker(worker_command, **kwargs))


async def finish(popen: subprocess.Popen[bytes], channel: socket.socket) -> int:
    """Close the channel (an idle worker then exits), reap, close the lifeline."""
    channel.close()
    with trio.fail_after(HANG):
        code = await trio.to_thread.run_sync(popen.wait)
    assert popen.stdin is not None
    popen.stdin.close()
    return code


def listening_ports() -> set[int]:
    """Ports this process listens on (TCP)."""
    return {c.laddr.port for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN}


# --- the channel works --------------------------------------------------------


async def test_a_job_round_trip_on_the_loopback_channel():
    started = await start_worker()
    try:
        assert started.popen.pid in {c.pid for c in psutil.Process().children()}
        assert started.channel.getpeername()[0] == "127.0.0.1"
        assert started.channel.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        worker = JobDriver(started.channel)
        assert await run_job(worker, workerfns.add, 1, 2) == 3
        assert await run_job(worker, workerfns.pid) == started.popen.pid
        # A large argument and result: several sends and receives each way.
        data = workerfns.pattern(3 * 2**20)
        assert await run_job(worker, workerfns.length_and_crc, data) == workerfns.length_and_crc(data)
        assert await run_job(worker, workerfns.modules_loaded, "trio") == {"trio": False}
        # The job's stdin is the null device, not the lifeline (reading that
        # would wait forever: the parent never writes to it again).
        assert await run_job(worker, lambda: sys.stdin.read()) == ""
    finally:
        code = await finish(started.popen, started.channel)
    assert code == 0  # EOF on the channel: a clean exit


async def test_the_listener_is_closed_once_the_worker_is_accepted():
    listener = loopback.LoopbackListener()
    port = listener.port
    assert port in listening_ports()
    popen = launch_worker(listener)
    with trio.fail_after(HANG):
        channel = await trio.to_thread.run_sync(listener.accept, popen)
    try:
        assert listener.closed
        assert port not in listening_ports()
        with pytest.raises(ValueError, match="accepts one worker only"):
            listener.accept(popen)
        # Nobody else can connect any more.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=HANG).close()
    finally:
        await finish(popen, channel)


# --- strangers ----------------------------------------------------------------


async def test_connections_without_the_secret_are_refused_and_the_worker_still_starts():
    # Short, so the silent stranger does not hold the test up for long; the
    # real worker sends its secret in the same breath as it connects.
    listener = loopback.LoopbackListener(secret_timeout=1.0)
    port = listener.port
    # The strangers connect first, so they are the first in the accept queue.
    silent = socket.create_connection(("127.0.0.1", port))
    wrong = socket.create_connection(("127.0.0.1", port))
    wrong.sendall(bytes(len(listener.secret)))
    short = socket.create_connection(("127.0.0.1", port))
    short.sendall(listener.secret[:-1])
    short.shutdown(socket.SHUT_WR)
    strangers = [silent, wrong, short]
    popen = launch_worker(listener)
    channel = None
    try:
        with trio.fail_after(HANG):
            channel = await trio.to_thread.run_sync(listener.accept, popen)
        assert_the_workers_own(channel, popen)
        assert_dropped(strangers)
        worker = JobDriver(channel)
        assert await run_job(worker, workerfns.add, 20, 22) == 42
    finally:
        await close_strangers_and_finish(strangers, popen, channel)


def assert_the_workers_own(channel: socket.socket, popen: subprocess.Popen[bytes]) -> None:
    """The accepted connection is the worker's own."""
    worker_ends = {c.laddr for c in psutil.Process(popen.pid).net_connections("tcp")}
    assert channel.getpeername() in worker_ends


async def close_strangers_and_finish(strangers, popen, channel) -> None:
    for stranger in strangers:
        stranger.close()
    if channel is None:  # the worker never got in
        popen.kill()
        channel = socket.socket()
    await finish(popen, channel)


def open_strangers(port: int, silent: int) -> list[socket.socket]:
    """Connections to ``port`` that never present the secret: ``silent`` ones
    that send nothing, one that sends a wrong secret, and one that sends the
    first bytes of one and then nothing more (a slow dribble, stopped)."""
    # With a timeout: a listener whose queue is full leaves a connect waiting.
    strangers = [socket.create_connection(("127.0.0.1", port), timeout=HANG) for _ in range(silent)]
    wrong = socket.create_connection(("127.0.0.1", port), timeout=HANG)
    wrong.sendall(bytes(loopback.SECRET_SIZE))
    dribbling = socket.create_connection(("127.0.0.1", port), timeout=HANG)
    dribbling.sendall(b"\x01\x02")
    return [*strangers, wrong, dribbling]


def assert_dropped(strangers: list[socket.socket]) -> None:
    """Each stranger reads EOF (or a reset): the parent closed its end, and sent nothing."""
    for stranger in strangers:
        stranger.settimeout(HANG)
        try:
            assert stranger.recv(1) == b""
        except ConnectionResetError:
            pass


async def accept_among(listener: loopback.LoopbackListener, popen, strangers: list[socket.socket]) -> socket.socket:
    """``listener.accept(popen)`` in a thread, with a hang guard that can end it:
    if it is not back within HANG seconds, the strangers are closed and the
    worker killed (so that accept returns, whatever it waits for), and the test fails."""
    gave_up = False

    async def give_up_after_hang() -> None:
        nonlocal gave_up
        await trio.sleep(HANG)
        gave_up = True
        popen.kill()
        for stranger in strangers:
            stranger.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(give_up_after_hang)
        try:
            channel = await trio.to_thread.run_sync(listener.accept, popen)
        finally:
            nursery.cancel_scope.cancel()
    if gave_up:
        channel.close()
        pytest.fail(f"the worker was not let in within {HANG} s while strangers held connections")
    return channel


@pytest.mark.parametrize("max_pending", [loopback.MAX_PENDING, 4])
async def test_silent_strangers_cannot_hold_the_door(max_pending):
    # Strangers would have far longer than the test's hang guard to present a
    # secret: if the worker gets in, it is not because they timed out first.
    listener = loopback.LoopbackListener(secret_timeout=10 * HANG, max_pending=max_pending)
    # More strangers than one check at a time could get through before the
    # 60 s start limit (12, with 5 s each), and, with max_pending=4, more than
    # are checked at once: the oldest make room for newer ones.
    strangers = open_strangers(listener.port, silent=20)
    popen = launch_worker(listener)
    channel = None
    try:
        channel = await accept_among(listener, popen, strangers)
        assert_the_workers_own(channel, popen)
        # Still connected and silent when the worker got in; dropped by now.
        assert_dropped(strangers)
        worker = JobDriver(channel)
        assert await run_job(worker, workerfns.add, 20, 22) == 42
    finally:
        await close_strangers_and_finish(strangers, popen, channel)


async def test_a_spawned_worker_starts_while_strangers_hold_its_port(monkeypatch):
    """The spawn backend on the loopback channel, end to end: strangers connect
    to the port the moment it exists, before the worker starts, and stay."""
    from trio_parallel_fs._backends.spawn import backend as _spawn

    monkeypatch.setenv("TRIO_PARALLEL_FS_CHANNEL", "loopback")
    strangers: list[socket.socket] = []

    def start_among_strangers(command, *args, **kwargs):
        def command_after_strangers(port):
            strangers.extend(open_strangers(port, silent=20))
            return command(port)

        return loopback.start_loopback_worker(command_after_strangers, *args, **kwargs)

    monkeypatch.setattr(_spawn, "start_loopback_worker", start_among_strangers)
    monkeypatch.setattr(loopback, "SECRET_TIMEOUT", 10 * HANG)
    try:
        with trio.fail_after(HANG):  # a hang guard only
            async with tpf.open_worker_context(worker_type="spawn") as ctx:
                assert await ctx.run_sync(workerfns.add, 1, 2) == 3
        assert len(strangers) == 22
        assert_dropped(strangers)
    finally:
        for stranger in strangers:
            stranger.close()


@pytest.mark.parametrize("where", ["open with a preload", "call with kill_on_cancel"])
def test_a_worker_whose_start_is_cancelled_under_asyncio_is_ended(monkeypatch, where):
    """asyncio raises a cancel held off while a thread started the worker as
    that wait ends, and the thread's result was lost: the worker lived on,
    connected, then stayed a zombie. Before, any asyncio.wait_for or Ctrl-C
    around a spawned open with a preload (Windows: always loopback) did that."""
    import asyncio
    import threading

    from trio_parallel_fs._backends.spawn import backend as _spawn

    monkeypatch.setenv("TRIO_PARALLEL_FS_CHANNEL", "loopback")
    entered = threading.Event()
    started: list[int] = []

    def start_and_tell(*args, **kwargs):
        entered.set()  # the cancel comes now, while this thread starts the worker
        worker = loopback.start_loopback_worker(*args, **kwargs)
        started.append(worker.popen.pid)
        return worker

    monkeypatch.setattr(_spawn, "start_loopback_worker", start_and_tell)

    async def use_a_context() -> None:
        if where == "open with a preload":
            async with tpf.open_worker_context(worker_type="spawn", preload=["preload_marker"]):
                pytest.fail("the open was cancelled")
        async with tpf.open_worker_context(worker_type="spawn") as ctx:
            await ctx.run_sync(workerfns.add, 1, 2, kill_on_cancel=True)
            pytest.fail("the call was cancelled")

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(use_a_context())
        while not entered.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    [pid] = started
    assert not psutil.pid_exists(pid)  # ended and reaped


async def test_a_worker_that_exits_before_connecting_is_reported_and_reaped():
    def command(port):
        return [sys.executable, "-c", "import sys; sys.exit(7)", str(port)]

    with trio.fail_after(HANG):
        expected = r"exited with code 7 before it (connected back|read its secret)"
        with pytest.raises(BrokenWorkerError, match=expected) as info:
            await trio.to_thread.run_sync(loopback.start_loopback_worker, command)
    assert info.value.exitcode == 7
    assert info.value.pid is not None and is_dead(info.value.pid)


async def test_a_worker_that_never_connects_is_killed_after_the_timeout():
    def command(port):
        # Reads its secret, then never connects.
        return [sys.executable, "-c", "import sys, time; sys.stdin.buffer.read(32); time.sleep(60)", str(port)]

    with trio.fail_after(HANG):
        with pytest.raises(BrokenWorkerError, match=r"did not connect back to 127\.0\.0\.1:\d+ within 0\.5 s") as info:
            await trio.to_thread.run_sync(lambda: loopback.start_loopback_worker(command, timeout=0.5))
    assert info.value.pid is not None and is_dead(info.value.pid)


def test_a_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        loopback.start_loopback_worker(worker_command, timeout=0)


def test_the_secret_is_fresh_for_each_worker():
    first, second = loopback.LoopbackListener(), loopback.LoopbackListener()
    try:
        assert len(first.secret) == child_loopback.SECRET_SIZE == loopback.SECRET_SIZE
        assert first.secret != second.secret
        assert first.port != second.port
    finally:
        first.close()
        second.close()


# --- the lifeline -------------------------------------------------------------


async def test_closing_the_lifeline_ends_a_busy_worker(tmp_path):
    started = await start_worker()
    worker = JobDriver(started.channel)
    marker = tmp_path / "busy"
    worker.send_job(workerfns.record_pid_and_sleep, str(marker), 60)
    with trio.fail_after(HANG):
        while not marker.exists():  # noqa: ASYNC110 - written by the worker
            await trio.sleep(0.01)
    assert started.popen.stdin is not None
    started.popen.stdin.close()
    with trio.fail_after(HANG):
        code = await trio.to_thread.run_sync(started.popen.wait)
    assert code == child_loopback.PARENT_GONE_EXIT_CODE
    # The job never answered: the channel just closes.
    assert isinstance(await trio.to_thread.run_sync(worker.receive), p.Closed)
    started.channel.close()


INTERMEDIATE_PARENT = """
import pickle, sys, time
sys.path[:0] = [{here!r}, {root!r}]
import test_loopback as t
import workerfns
from trio_parallel_fs._backends.spawn.loopback import start_loopback_worker

started = start_loopback_worker(t.worker_command)
t.JobDriver(started.channel).send_job(workerfns.record_pid_and_sleep, {marker!r}, 60)
print(started.popen.pid, flush=True)
time.sleep(120)
"""


def start_script(script, out_path) -> subprocess.Popen[bytes]:
    # Its output to a file, not a pipe: an orphaned worker would hold a pipe open.
    with open(out_path, "w") as out:
        return subprocess.Popen([sys.executable, str(script)], stdout=out)


async def test_a_busy_worker_dies_within_two_seconds_of_its_parents_sigkill(tmp_path):
    marker = tmp_path / "busy"
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(INTERMEDIATE_PARENT.format(here=HERE, root=ROOT, marker=str(marker))))
    out_path = tmp_path / "out"
    parent = start_script(script, out_path)
    worker_pid = None
    try:
        with trio.fail_after(HANG):
            while not marker.exists():  # noqa: ASYNC110 - written by the worker
                assert parent.poll() is None, "the intermediate parent died on its own"
                await trio.sleep(0.01)
        worker_pid = int(marker.read_text())
        assert worker_pid == int(out_path.read_text())
        assert not is_dead(worker_pid)
        parent.kill()  # SIGKILL; TerminateProcess on Windows: no chance to clean up
        with trio.fail_after(HANG):
            await trio.to_thread.run_sync(parent.wait)
        # The lifeline's EOF is immediate and the worker sleeps with the GIL
        # released: two seconds is a bound for "at once", not a benchmark.
        with trio.fail_after(2):
            while not is_dead(worker_pid):  # noqa: ASYNC110 - polling another process
                await trio.sleep(0.005)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        # If the test failed, the orphan is no longer our descendant, but we
        # started it: end it, after checking it is still that worker.
        if worker_pid is not None and not is_dead(worker_pid):
            try:
                process = psutil.Process(worker_pid)
                if "connect_to_parent" in " ".join(process.cmdline()):
                    process.kill()
            except psutil.Error:
                pass

