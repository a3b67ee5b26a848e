"""Every test proves that the processes and file descriptors it started are gone."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import anyio
import psutil
import pytest
import trio

from trio_parallel_fs import _frontend

HERE = os.path.dirname(os.path.abspath(__file__))
# Workers import the test helpers by reference, as they would the user's code.
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak",
        action="store_true",
        help="run the stress suite at full size (10,000 jobs per backend); same as TPF_SOAK=1",
    )


def pytest_configure(config: pytest.Config) -> None:
    # test_stress.py reads TPF_SOAK when it is imported, after this hook.
    if config.getoption("--soak"):
        os.environ["TPF_SOAK"] = "1"


def descendants() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def open_fds() -> set[tuple[int, str]]:
    """Open fds with what they point at (a number alone may be reused).

    Linux says what each fd is; macOS only which numbers are open (/dev/fd);
    Windows has no such listing, and its leak check is left out.
    """
    fds = set()
    if os.path.isdir("/proc/self/fd"):
        for fd in os.listdir("/proc/self/fd"):
            try:
                fds.add((int(fd), os.readlink(f"/proc/self/fd/{fd}")))
            except FileNotFoundError:  # the fd of the listing itself, now closed
                pass
    elif os.path.isdir("/dev/fd"):
        for fd in os.listdir("/dev/fd"):
            try:
                os.fstat(int(fd))
            except OSError:  # the fd of the listing itself, now closed
                continue
            fds.add((int(fd), ""))
    return fds


def wait_until_gone(pids: set[int], timeout: float) -> set[int]:
    """Return the pids still present (zombies count) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        alive = {pid for pid in pids if psutil.pid_exists(pid)}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


def is_dead(pid: int) -> bool:
    """Gone, or a zombie waiting to be reaped."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_dead(pid: int) -> None:
    with trio.fail_after(30):
        while not is_dead(pid):  # noqa: ASYNC110 - polling other processes
            await trio.sleep(0.005)


@pytest.fixture(autouse=True)
def no_leftovers():
    """Fail a test that leaves a process (template, worker, zombie) or an fd behind.

    The default context lives across trio.run calls by design, so it is shut
    down here, as interpreter exit would.
    """
    before_pids = {p.pid for p in descendants()}
    before_fds = open_fds()
    yield
    _frontend._shut_down_default_context()
    _frontend._default_config = _frontend.WorkerConfig()
    new = {p.pid for p in descendants()} - before_pids
    left = wait_until_gone(new, 5.0)
    details = [psutil.Process(p).as_dict(["pid", "cmdline", "status"]) for p in left if psutil.pid_exists(p)]
    assert not left, f"processes left behind: {details}"
    leaked = open_fds() - before_fds
    assert not leaked, f"file descriptors left open: {sorted(leaked)}"


@pytest.fixture(params=["forkserver", "spawn"])
def area_worker_type(request):
    """Both backends where workers get a shared memory area: spawned ones only
    where their channel is a Unix socket that can carry the area's fd (the
    loopback channel cannot: its workers use the socket)."""
    from trio_parallel_fs._backends.spawn.backend import channel_kind

    if request.param == "spawn" and channel_kind() == "loopback":
        pytest.skip("spawned workers on the loopback channel have no area (TCP cannot carry an fd)")
    return request.param


def dev_shm() -> set[str]:
    """The library's shared memory objects in /dev/shm (other programs' come
    and go there: multiprocessing's semaphores, another test run's)."""
    from _trio_parallel_fs_worker import _shm

    names = os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []
    return {name for name in names if name.startswith(_shm._SHM_PREFIX.lstrip("/"))}


@pytest.fixture(
    params=[
        pytest.param(
            "forkserver",
            marks=pytest.mark.skipif(sys.platform == "win32", reason="the template needs fork; Windows has none"),
        ),
        "spawn",
    ]
)
def worker_type(request):
    return request.param


@pytest.fixture(scope="session")
def uvloop_if_installed():
    """uvloop, or None. It keeps a pipe open for the process once a first loop
    ran: that happens here, before conftest's leak check of a test takes its
    list of fds (a session fixture is set up before function ones)."""
    try:
        import uvloop
    except ImportError:
        return None
    uvloop.run(asyncio.sleep(0))
    return uvloop


@pytest.fixture(params=["trio", "asyncio", "uvloop"])
def run(request, uvloop_if_installed):
    """Run an async function under one loop (by ``anyio.run``); ``run.loop``
    says whose rules apply ("trio" or "asyncio": uvloop is an asyncio loop)."""
    options = {}
    if request.param == "uvloop":
        if uvloop_if_installed is None:
            pytest.skip("uvloop is not installed (the test extra has it, but not on Windows)")
        options = {"use_uvloop": True}
    backend = "trio" if request.param == "trio" else "asyncio"

    def run(async_fn, *args):
        return anyio.run(async_fn, *args, backend=backend, backend_options=options)

    run.loop = backend
    return run
