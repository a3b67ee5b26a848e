"""A backend whose workers are Trio tasks following a script: the pool's rules
tested in milliseconds, without processes.

Each fake worker serves its end of a real socketpair with the worker's side of
the sans-IO protocol, so the pool runs exactly its production code. A script
is a list of actions, one per job:

* ``"value"``: run the job here and send its result back;
* ``("retire", Retire.X)``: send the result saying the worker leaves, and exit 0;
* ``"bye"``: the idle timeout fired: send Bye without running the job, exit 0;
* ``"bye-lost"``: the same on Windows, where the worker's exit with the job
  unread resets the connection and the reset drops the Bye;
* ``"bye-after"``: send the result, then at once a Bye, and exit 0;
* ``("die", code)``: close the channel and exit with ``code`` mid-job;
* ``"hang"``: never answer (until killed);
* ``("slow", seconds)``: take that long, then answer;
* ``"init-failed"``: the init hook raised;
* ``("started", memory)``: say the init hook returned (with a memory figure),
  then take the next action for the same job.
"""

from __future__ import annotations

import itertools
import pickle
import socket
import threading
from collections.abc import Callable
from typing import Any

import trio

from _trio_parallel_fs_worker import protocol as p
from _trio_parallel_fs_worker.codec import encode_error
from trio_parallel_fs._backends.seam import ExitInfo

_pids = itertools.count(900_001)


class FakeProcess:
    def __init__(self) -> None:
        self.pid = next(_pids)
        self.exitcode: int | None = None
        self.killed = False
        self._exited = threading.Event()
        self.cancel_scope: trio.CancelScope | None = None
        self.sock: socket.socket | None = None

    def answered(self) -> bool:
        return True

    def give_up(self) -> ExitInfo:
        self.kill()
        return self.info()

    def exit(self, code: int) -> None:
        if self.exitcode is None:
            self.exitcode = code
            if self.sock is not None:
                trio.lowlevel.notify_closing(self.sock)  # its serving task may be waiting on it
                self.sock.close()
            self._exited.set()

    def kill(self) -> None:
        if self.exitcode is None:
            self.killed = True
            if self.cancel_scope is not None:
                self.cancel_scope.cancel()
            self.exit(-9)

    def info(self) -> ExitInfo:
        return ExitInfo(pid=self.pid, exitcode=self.exitcode)

    def has_exited(self) -> bool:
        return self._exited.is_set()

    def exited_cleanly(self) -> bool:
        return self.exitcode == 0

    async def wait(self) -> ExitInfo:
        while not self._exited.is_set():  # noqa: ASYNC110 - set from any thread
            await trio.sleep(0.001)
        return self.info()

    def wait_blocking(self, timeout: float) -> ExitInfo | None:
        return self.info() if self._exited.wait(timeout) else None

    def release(self) -> bool:
        return True

    def forget(self) -> None:
        pass


class FakeBackend:
    """Hands out scripted workers; ``scripts`` gives each new worker its script."""

    def __init__(self, nursery: trio.Nursery, scripts: list[list[Any]]) -> None:
        self.nursery = nursery
        self.scripts = list(scripts)
        self.processes: list[FakeProcess] = []
        self.starts = 0
        self.closed = False
        self.before_start: Callable[[], Any] | None = None  # an async hook, to race with close

    @property
    def template_pid(self) -> None:
        return None

    async def start(self) -> None:
        self.starts += 1
        if self.before_start is not None:
            await self.before_start()

    async def start_worker(self) -> tuple[socket.socket, FakeProcess]:
        if self.closed:
            raise BrokenPipeError("closed")
        ours, theirs = socket.socketpair()
        process = FakeProcess()
        process.sock = theirs
        self.processes.append(process)
        script = self.scripts.pop(0) if self.scripts else ["value"] * 100
        self.nursery.start_soon(_serve, theirs, process, script)
        return ours, process

    def start_worker_now(self) -> None:
        return None

    def close(self, timeout: float) -> None:
        self.closed = True

    def forget_after_fork(self) -> None:
        pass


async def _serve(sock: socket.socket, process: FakeProcess, script: list[Any]) -> None:
    if process.exitcode is not None:
        return  # killed before it got going
    connection = p.Connection(p.WORKER)
    stream = trio.socket.from_stdlib_socket(sock)

    async def next_event() -> p.Event:
        while (event := connection.next_event()) is p.NEED_DATA:
            try:
                connection.receive_data(await stream.recv(1 << 16))
            except OSError:
                connection.receive_data(b"")
        return event  # type: ignore[return-value]

    async def send(event: p.Event) -> None:
        for part in connection.send(event):
            view = memoryview(part)
            while view:
                view = view[await stream.send(view) :]

    with trio.CancelScope() as scope:
        process.cancel_scope = scope
        try:
            await next_event()  # Config
            actions = list(script)  # those not taken yet, taken from the front
            while True:
                if actions[:1] == ["bye-lost"]:
                    # Windows: the idle timeout fired as the job came; the worker
                    # exits with the job unread, and the reset drops its Bye.
                    await trio.lowlevel.wait_readable(sock)
                    await trio.sleep(0.01)  # the whole job, not its first bytes
                    process.exit(0)
                    return
                job = await next_event()
                while isinstance(job, p.Area):
                    # Every worker gets its shared memory area with its first job;
                    # a fake one serves small buffers only (its fd went unread).
                    job = await next_event()
                if not isinstance(job, p.Job):
                    process.exit(0)  # EOF: the pool closed our channel
                    return
                action = actions.pop(0) if actions else "value"
                while isinstance(action, tuple) and action[0] == "started":
                    await send(p.Started(action[1]))
                    action = actions.pop(0) if actions else "value"
                if action == "hang":
                    await trio.sleep_forever()
                if isinstance(action, tuple) and action[0] == "slow":
                    await trio.sleep(action[1])
                if action == "bye":
                    await send(p.Bye())
                    process.exit(0)
                    return
                if action == "init-failed":
                    await send(p.InitFailed(encode_error(RuntimeError("init went wrong"))))
                    process.exit(1)
                    return
                if isinstance(action, tuple) and action[0] == "die":
                    process.exit(action[1])
                    return
                fn, args = pickle.loads(job.pickled, buffers=job.buffers)
                retire = action[1] if isinstance(action, tuple) and action[0] == "retire" else p.Retire.KEEP
                await send(p.Value(pickle.dumps(fn(*args)), retire=retire))
                if action == "bye-after":
                    await send(p.Bye())
                if retire is not p.Retire.KEEP or action == "bye-after":
                    process.exit(0)
                    return
        except OSError:
            process.exit(-9)
