"""The Dask backend against a real LocalCluster: two worker processes (each
with its nanny) of one thread each, started once for this file.

The job functions below live at module level: the workers import this module
to run them, as they would the user's code.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from multiprocessing import resource_tracker
from pathlib import Path

import anyio
import dask
import distributed
import psutil
import pytest
import trio
import trio.testing
from conftest import descendants, open_fds, wait_until_gone

import trio_parallel_fs
from trio_parallel_fs.dask import open_dask_context

# A stdlib module that a fresh Dask worker has not imported.
PRELOADED = "colorsys"


def imported(module: str) -> str:
    """An expression for ``eval`` on a worker: is ``module`` imported there?
    (``eval`` is a builtin, so running it imports nothing on the worker.)"""
    return f"{module!r} in __import__('sys').modules"


# --- jobs (they run on the workers) ------------------------------------------


class JobFailed(Exception):
    pass


def fail(x: int) -> None:
    def nested() -> None:
        raise JobFailed(f"job failed on {x}")

    nested()


def die(code: int) -> None:
    os._exit(code)


def spin(pid_file: str, seconds: float) -> int:
    """Busy the CPU; say which process does it first."""
    Path(pid_file).write_text(str(os.getpid()))
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return os.getpid()


def nap(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


async def coroutine_fn() -> None:
    pass


def generator_fn() -> object:
    yield 1


def plugin_names(dask_scheduler: object) -> list[str]:
    return list(dask_scheduler.worker_plugins)  # type: ignore[attr-defined]


# --- the cluster, once per file -------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def no_leftovers(uvloop_if_installed):
    """This file's version of conftest's check: a cluster kept for the whole
    module would trip a per-test check, so the check is per module, after
    the cluster has closed. (uvloop's pipe of the process, opened by its
    first loop, is opened before the snapshot: see uvloop_if_installed.)"""
    # multiprocessing's helper process (and the pipe to it), which the nannies'
    # spawning starts on first use and which lives as long as this interpreter:
    # started here, before the snapshot, it is not one of the cluster's.
    resource_tracker.ensure_running()
    before_pids = {p.pid for p in descendants()}
    before_fds = open_fds()
    yield
    new = {p.pid for p in descendants()} - before_pids
    left = wait_until_gone(new, 10.0)
    details = [psutil.Process(p).as_dict(["pid", "cmdline", "status"]) for p in left if psutil.pid_exists(p)]
    assert not left, f"processes left behind: {details}"
    # The closed cluster's objects (which refer to each other) may still hold
    # the pipes of its worker processes, until they are collected: once in
    # three runs after lost-worker-timeout (below) was raised.
    gc.collect()
    leaked = open_fds() - before_fds
    assert not leaked, f"file descriptors left open: {sorted(leaked)}"


@pytest.fixture(scope="module")
def cluster(no_leftovers):
    # allowed_failures=0: a job whose worker dies fails at once, as run_sync's
    # does locally (Dask's default retries it on three more workers).
    # dashboard_address=":0": the scheduler serves HTTP on a free port (with
    # None it tries 8787 first, and warns, an error here, when another
    # cluster on this machine has it).
    # lost-worker-timeout: when a worker leaves, the LocalCluster looks again
    # this long after (15 s by default), and closes the worker's nanny for
    # good if no worker of that name is there at that moment. A nanny restart
    # of the same worker then (a kill 15 s after another) lost the worker for
    # the rest of the module: "only 1/2 workers arrived". Here every worker
    # that leaves is one a nanny restarts.
    with (
        dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"}),
        distributed.LocalCluster(
            processes=True,
            n_workers=2,
            threads_per_worker=1,
            dashboard_address=":0",
            scheduler_kwargs={"allowed_failures": 0},
        ) as cluster,
    ):
        yield cluster


@pytest.fixture(scope="module")
def client(cluster):
    with distributed.Client(cluster, set_as_default=False) as client:
        yield client


@pytest.fixture(autouse=True)
def two_workers(client):
    """Each test starts with both workers up: a nanny replaces a killed worker
    in the background, which can outlast the test that killed it."""
    client.wait_for_workers(2, timeout=60)


async def cancel_after(scope: trio.CancelScope, seconds: float) -> None:
    await trio.sleep(seconds)
    scope.cancel()


async def on_workers(client, fn, *args):
    """``client.run`` (a blocking call) from Trio: {worker address: result}."""
    return await trio.to_thread.run_sync(lambda: client.run(fn, *args))


async def restart_all_workers(client):
    workers = list(client.scheduler_info()["workers"])
    await trio.to_thread.run_sync(lambda: client.restart_workers(workers, timeout=60))


# --- tests -----------------------------------------------------------------------


def test_importing_trio_parallel_fs_does_not_import_dask():
    code = (
        "import sys, trio_parallel_fs\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed'))\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "[]\n"


async def test_results_come_back_in_order(client):
    with trio.fail_after(60):
        async with open_dask_context(client) as ctx:
            assert await ctx.run_sync(pow, 2, 10) == 1024
            results = [None] * 8

            async def one(i: int) -> None:
                results[i] = await ctx.run_sync(pow, i, 2)

            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(one, i)
            assert results == [i * i for i in range(8)]
            stats = ctx.statistics()
    assert (stats.submitted_jobs, stats.completed_jobs, stats.running_jobs) == (9, 9, 0)


async def test_a_job_error_arrives_with_its_type_and_remote_traceback(client):
    with trio.fail_after(60):
        async with open_dask_context(client) as ctx:
            with pytest.raises(JobFailed, match="^job failed on 7$") as caught:
                await ctx.run_sync(fail, 7)
            stats = ctx.statistics()
    remote = caught.value.__cause__
    assert isinstance(remote, trio_parallel_fs.RemoteTraceback)
    # The worker's frames, in the file they come from, ending with the error.
    assert "in nested" in remote.text
    assert f'File "{__file__}"' in remote.text
    assert remote.text.rstrip().endswith("JobFailed: job failed on 7")
    assert (stats.failed_jobs, stats.completed_jobs) == (1, 0)


async def test_async_and_generator_functions_are_refused(client):
    async with open_dask_context(client) as ctx:
        with pytest.raises(TypeError, match=r"coroutine_fn is an async function; run_sync runs synchronous"):
            await ctx.run_sync(coroutine_fn)
        with pytest.raises(TypeError, match=r"generator_fn is a generator function"):
            await ctx.run_sync(generator_fn)
        with pytest.raises(TypeError, match=r"run_sync needs a callable, not int 3"):
            await ctx.run_sync(3)
        assert ctx.statistics().submitted_jobs == 0


async def test_the_checks_and_messages_are_the_local_run_syncs(client):
    """One front end for every worker type: the same refusals, word for word,
    and trio-parallel's older name for kill_on_cancel."""
    async with open_dask_context(client) as ctx:
        with pytest.raises(TypeError) as dask_error:
            await ctx.run_sync(pow, 2, exp=3)
        with pytest.raises(TypeError) as local_error:
            await trio_parallel_fs.run_sync(pow, 2, exp=3)
        assert str(dask_error.value) == str(local_error.value)
        assert "Bind them first: run_sync(functools.partial(pow, exp=exp), *args)" in str(dask_error.value)
        with trio.CancelScope() as scope:
            scope.cancel()
            await ctx.run_sync(nap, 600, cancellable=True)
        assert scope.cancelled_caught
        assert ctx.statistics().submitted_jobs == 0


async def test_a_call_waiting_for_its_limiter_when_the_context_closes_is_refused(client):
    """As locally: the call never reaches a closed context's cluster."""
    limiter = trio.CapacityLimiter(1)
    holder = object()
    errors = []
    with trio.fail_after(60):
        async with trio.open_nursery() as outer:
            async with open_dask_context(client) as ctx:
                await limiter.acquire_on_behalf_of(holder)

                async def waiting_call() -> None:
                    try:
                        await ctx.run_sync(pow, 2, 2, limiter=limiter)
                    except trio.ClosedResourceError as exc:
                        errors.append(exc)

                outer.start_soon(waiting_call)
                await trio.testing.wait_all_tasks_blocked()
            limiter.release_on_behalf_of(holder)
    assert [str(error) for error in errors] == ["this Dask context closed while the call waited"]
    assert ctx.statistics().submitted_jobs == 0


async def test_an_unpicklable_argument_is_named(client):
    async with open_dask_context(client) as ctx:
        with pytest.raises(
            pickle.PicklingError,
            match=r"^cannot send len to the Dask cluster: argument 0 \(lock\) could not be pickled \(TypeError: ",
        ):
            with trio.fail_after(30):
                await ctx.run_sync(len, threading.Lock())
        assert ctx.statistics().failed_jobs == 1


async def test_entering_run_sync_is_a_checkpoint(client):
    async with open_dask_context(client) as ctx:
        with trio.CancelScope() as scope:
            scope.cancel()
            await ctx.run_sync(pow, 2, 2)
        assert scope.cancelled_caught
        assert ctx.statistics().submitted_jobs == 0


async def test_without_kill_on_cancel_the_call_is_shielded(client):
    got = None
    with trio.fail_after(60):
        async with open_dask_context(client) as ctx:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cancel_after, scope, 0.3)
                    got = await ctx.run_sync(nap, 1.5)
                    await trio.sleep(10)  # the cancellation lands here
            stats = ctx.statistics()
    assert scope.cancelled_caught
    assert got == "slept"
    assert (stats.completed_jobs, stats.killed_jobs) == (1, 0)


async def spin_then_cancel(ctx, pid_file) -> bool:
    """Run ``spin`` with kill_on_cancel and cancel the call once the job has
    written its pid; whether the cancellation was caught."""
    with trio.CancelScope() as scope:

        async def cancel_once_spinning() -> None:
            while not pid_file.exists() or not pid_file.read_text():  # noqa: ASYNC110
                await trio.sleep(0.02)
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_once_spinning)
            await ctx.run_sync(spin, str(pid_file), 600, kill_on_cancel=True)
    return scope.cancelled_caught


async def spin_then_cancel_under_asyncio(ctx, pid_file) -> None:
    """`spin_then_cancel` in asyncio's terms: task.cancel() once the job has
    written its pid; the call ends cancelled and the job's process is gone."""
    import asyncio

    call = asyncio.ensure_future(ctx.run_sync(spin, str(pid_file), 600, kill_on_cancel=True))
    while not pid_file.exists() or not pid_file.read_text():  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert not wait_until_gone({int(pid_file.read_text())}, 10)


async def test_kill_on_cancel_kills_the_worker_process_and_frees_its_slot(client, tmp_path):
    pid_file = tmp_path / "pid"
    with trio.fail_after(90):
        async with open_dask_context(client) as ctx:
            assert await spin_then_cancel(ctx, pid_file)
            spinner = int(pid_file.read_text())
            # run_sync returned once the process was gone (a zombie at most).
            try:
                assert psutil.Process(spinner).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                pass
            # Both slots serve jobs again: the other worker, and a fresh one
            # the nanny started in place of the killed one.
            await trio.to_thread.run_sync(lambda: client.wait_for_workers(2))
            pids = []

            async def one(i: int) -> None:
                pids.append(await ctx.run_sync(spin, str(tmp_path / f"pid{i}"), 0.5))

            async with trio.open_nursery() as nursery:
                for i in range(2):
                    nursery.start_soon(one, i)
            stats = ctx.statistics()
    assert len(set(pids)) == 2 and spinner not in pids
    assert (stats.killed_jobs, stats.restarted_workers, stats.completed_jobs) == (1, 1, 2)


async def test_kill_on_cancel_of_a_job_not_started_kills_nothing(client):
    wide = trio.CapacityLimiter(3)  # let a third job wait on Dask's side
    naps = []
    with trio.fail_after(60):
        async with open_dask_context(client) as ctx:

            async def nap_on(seconds: float) -> None:
                naps.append(await ctx.run_sync(nap, seconds, limiter=wide))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(nap_on, 1.5)
                nursery.start_soon(nap_on, 1.5)
                await trio.sleep(0.5)  # both workers busy
                with trio.CancelScope() as scope:
                    nursery.start_soon(cancel_after, scope, 0.5)
                    await ctx.run_sync(nap, 600, kill_on_cancel=True, limiter=wide)
            stats = ctx.statistics()
    assert scope.cancelled_caught
    assert naps == ["slept", "slept"]
    assert (stats.killed_jobs, stats.restarted_workers, stats.completed_jobs) == (1, 0, 2)


async def test_a_worker_dying_mid_job_is_a_broken_worker_error(client):
    with trio.fail_after(90):
        async with open_dask_context(client) as ctx:
            with pytest.raises(trio_parallel_fs.BrokenWorkerError) as caught:
                await ctx.run_sync(die, 3)
            # The cluster heals: the nanny starts a new worker.
            assert await ctx.run_sync(pow, 3, 3) == 27
            stats = ctx.statistics()
    error = caught.value
    assert isinstance(error.__cause__, distributed.scheduler.KilledWorker)
    address = error.__cause__.last_worker.address
    assert f"the Dask worker at {address} (pid {error.pid}) died while running test_dask.die" in str(error)
    assert error.function == "test_dask.die"
    assert isinstance(error.pid, int)
    assert (stats.broken_jobs, stats.completed_jobs) == (1, 1)


async def test_statistics_after_a_recovered_call_show_the_cluster_as_it_is(client, tmp_path):
    """After a worker died under a job (or was killed for kill_on_cancel), the
    calls look at the cluster themselves until it is whole again: the
    periodic look may have caught the nanny's restart halfway (it reported
    workers=0, total_threads=0 on a one-worker cluster), and may not come
    again for ``refresh_interval``. Here it never comes after the open
    (refresh_interval=3600), and the view it left is put back to that
    halfway one (no worker) before each fault."""

    async def wait_for_two_workers() -> None:
        await trio.to_thread.run_sync(lambda: client.wait_for_workers(2, timeout=60))

    with trio.fail_after(150):
        async with open_dask_context(client, refresh_interval=3600) as ctx:
            ctx._set_workers({})  # what a look during a restart saw
            with pytest.raises(trio_parallel_fs.BrokenWorkerError):
                await ctx.run_sync(die, 3)
            await wait_for_two_workers()  # the nanny's new worker
            assert await ctx.run_sync(pow, 2, 3) == 8
            stats = ctx.statistics()
            assert (stats.workers, stats.total_threads, ctx.limiter.total_tokens) == (2, 2, 2)

            # The same after a restart of ours.
            ctx._set_workers({})
            pid_file = tmp_path / "pid"
            await spin_then_cancel(ctx, pid_file)
            await wait_for_two_workers()
            assert await ctx.run_sync(pow, 2, 3) == 8
            stats = ctx.statistics()
            assert (stats.workers, stats.total_threads, stats.restarted_workers) == (2, 2, 1)


async def test_preload_reaches_current_and_future_workers(client):
    with trio.fail_after(120):
        await restart_all_workers(client)
        before = await on_workers(client, eval, imported(PRELOADED))
        assert set(before.values()) == {False}
        async with open_dask_context(client, preload=[PRELOADED]) as ctx:
            now = await on_workers(client, eval, imported(PRELOADED))
            assert set(now.values()) == {True}
            await restart_all_workers(client)
            # New worker processes: the plugin ran before their first job...
            assert await ctx.run_sync(eval, imported(PRELOADED)) is True
            later = await on_workers(client, eval, imported(PRELOADED))
            assert set(later.values()) == {True} and set(later) != set(now)
            # ...and it travels by value: the workers need not import trio.
            assert set((await on_workers(client, eval, imported("trio"))).values()) == {False}
            assert ctx.statistics().preload == (PRELOADED,)
        # The plugin leaves with the context.
        await restart_all_workers(client)
        after = await on_workers(client, eval, imported(PRELOADED))
        assert set(after.values()) == {False}
        assert not [name for name in client.run_on_scheduler(plugin_names) if "trio_parallel_fs" in name]


async def test_a_failing_preload_raises_at_open_and_leaves_no_plugin(client):
    with trio.fail_after(60):
        with pytest.raises(ImportError, match=r"could not preload \['no_such_module_here'\] on the Dask workers"):
            async with open_dask_context(client, preload=["no_such_module_here"]):
                pass  # pragma: no cover
        names = await trio.to_thread.run_sync(client.run_on_scheduler, plugin_names)
    assert not [name for name in names if "trio_parallel_fs" in name]


async def test_the_limiter_follows_workers_that_join_and_leave(cluster, client):
    # A worker of three threads from outside the cluster object, as on a real
    # cluster where workers come and go. (Scaling the LocalCluster itself up
    # and down at once races in distributed: its close then fails now and
    # then with a KeyError.)
    extra = [
        *[sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address],
        *["--nthreads", "3", "--no-nanny", "--no-dashboard", "--name", "extra"],
    ]
    with trio.fail_after(120):
        async with open_dask_context(client, refresh_interval=0.05) as ctx:
            assert ctx.limiter.total_tokens == 2
            assert (ctx.statistics().workers, ctx.statistics().total_threads) == (2, 2)
            worker = await trio.lowlevel.open_process(extra, stderr=subprocess.DEVNULL)
            try:
                while ctx.limiter.total_tokens != 5:  # noqa: ASYNC110 - polling the context
                    await trio.sleep(0.05)
                assert (ctx.statistics().workers, ctx.statistics().total_threads) == (3, 5)
            finally:
                worker.terminate()  # a graceful close: it unregisters
                await worker.wait()
            while ctx.limiter.total_tokens != 2:  # noqa: ASYNC110 - polling the context
                await trio.sleep(0.05)
            assert ctx.statistics().workers == 2


async def test_a_limiter_of_ones_own(client):
    limiter = trio.CapacityLimiter(1)
    async with open_dask_context(client) as ctx:
        assert await ctx.run_sync(pow, 5, 2, limiter=limiter) == 25
        with pytest.raises(TypeError, match="limiter must be a trio.CapacityLimiter"):
            await ctx.run_sync(pow, 5, 2, limiter=3)


async def test_an_address_gets_its_own_client_closed_at_exit(cluster):
    with trio.fail_after(60):
        async with open_dask_context(cluster.scheduler_address) as ctx:
            assert await ctx.run_sync(pow, 2, 5) == 32
            assert ctx.statistics().scheduler_address == cluster.scheduler_address
            own = ctx.client
        assert own.status == "closed"


async def test_a_client_passed_in_stays_open(client):
    async with open_dask_context(client) as ctx:
        assert ctx.client is client
        assert await ctx.run_sync(pow, 2, 3) == 8
    assert client.status == "running"
    assert await trio.to_thread.run_sync(lambda: client.submit(pow, 2, 4).result()) == 16
    with pytest.raises(trio.ClosedResourceError, match="this Dask context is closed"):
        await ctx.run_sync(pow, 2, 3)


async def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match=r"preload takes a list of module names, not a string; did you mean \['numpy"):
        async with open_dask_context("tcp://127.0.0.1:1", preload="numpy"):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match=r"preload entries must be absolute module names, not ''"):
        async with open_dask_context("tcp://127.0.0.1:1", preload=["numpy", ""]):
            pass  # pragma: no cover
    with pytest.raises(TypeError, match=r"takes a distributed.Client or a scheduler address .* not int 8786"):
        async with open_dask_context(8786):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match=r"connect_timeout must be a positive number of seconds, not 0"):
        async with open_dask_context(UNREACHABLE, connect_timeout=0):
            pass  # pragma: no cover


# --- a wrong address --------------------------------------------------------------

# Port 1 on loopback: nothing listens there, so every attempt is refused and
# Dask tries again until the timeout.
UNREACHABLE = "tcp://127.0.0.1:1"


def loop_threads() -> set[threading.Thread]:
    """Threads that run a Client's event loop (Dask names them so)."""
    return {thread for thread in threading.enumerate() if thread.name == "IO loop"}


async def test_an_unreachable_scheduler_fails_within_connect_timeout_and_leaves_no_thread():
    before = loop_threads()
    with trio.fail_after(30), pytest.raises(OSError) as caught:  # 30 s: a hang guard, Dask's default
        async with open_dask_context(UNREACHABLE, connect_timeout=1.5):
            pass  # pragma: no cover
    message = str(caught.value)
    assert message.startswith(
        f"open_dask_context could not connect to the Dask scheduler at {UNREACHABLE!r} within "
        "connect_timeout=1.5 s (OSError: Timed out trying to connect"
    )
    if "the last attempt:" in message:  # none when the timeout ran out during the first (a busy machine)
        # A refusal; or, on a busy machine, an attempt the timeout cut short.
        last = message.partition("the last attempt:")[2]
        assert "ConnectionRefusedError" in last or "TimeoutError" in last, last
    assert "Is the scheduler running" in message and "longer connect_timeout" in message
    # The client Dask closed after its failed connect kept its loop thread.
    deadline = time.monotonic() + 10
    while loop_threads() - before and time.monotonic() < deadline:  # noqa: ASYNC110
        await trio.sleep(0.02)
    assert not loop_threads() - before


def test_the_default_connect_timeout_is_at_most_ten_seconds():
    import inspect

    from trio_parallel_fs import dask

    default = inspect.signature(dask.open_dask_context).parameters["connect_timeout"].default
    assert default == dask.CONNECT_TIMEOUT <= 10


async def test_a_malformed_address_is_named():
    before = loop_threads()
    with trio.fail_after(30):
        with pytest.raises(ValueError) as caught:
            async with open_dask_context("127.0.0.1:8786x"):
                pass  # pragma: no cover
    assert str(caught.value).startswith(
        "open_dask_context could not read the Dask scheduler address '127.0.0.1:8786x': "
        "invalid literal for int() with base 10: '8786x'. A scheduler's address looks like "
        "'tcp://192.168.1.5:8786'"
    )
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert not loop_threads() - before


UNREADABLE = "open_dask_context could not read the Dask scheduler address"

WRONG_ADDRESS_PROGRAM = """
import sys
import trio
from trio_parallel_fs.dask import open_dask_context

async def main(address):
    async with open_dask_context(address, connect_timeout=2):
        pass

trio.run(main, sys.argv[1])
"""


@pytest.mark.parametrize(
    ("address", "last_line"),
    [
        ("127.0.0.1:8786x", f"ValueError: {UNREADABLE} '127.0.0.1:8786x': "),
        ("tcp://[::1", f"ValueError: {UNREADABLE} 'tcp://[::1': "),
        (UNREACHABLE, f"OSError: open_dask_context could not connect to the Dask scheduler at {UNREACHABLE!r} "),
    ],
)
def test_a_program_given_a_wrong_address_fails_clearly_and_exits_at_once(tmp_path, address, last_line):
    """The error ends the program, with our message as the last line and none
    of Dask's frames; and the program exits then (a half-built Client used to
    hang it at exit, closing itself from ``__del__``)."""
    program = tmp_path / "wrong_address.py"
    program.write_text(WRONG_ADDRESS_PROGRAM)
    # The hang guard, and what this test is about: the old hang at exit lasted
    # beyond 60 s; 30 s is far above the program's 2 s connect_timeout.
    out = subprocess.run([sys.executable, str(program), address], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1, out.stderr
    assert out.stderr.rstrip().splitlines()[-1].startswith(last_line), out.stderr
    assert f"{os.sep}distributed{os.sep}" not in out.stderr, out.stderr


# --- the demonstration (python -m trio_parallel_fs) ---------------------------


def test_the_demo_runs_its_jobs_on_a_local_cluster():
    out = subprocess.run(
        [sys.executable, "-m", "trio_parallel_fs", "--dask", "--warm-calls", "5", "--batch", "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert "Dask LocalCluster: " in out.stdout
    assert "\nbatch of 4 numpy/scipy jobs, wall time " in out.stdout


def test_the_dask_extra_is_named_with_an_install_line_that_works_from_a_checkout():
    """``pip install 'trio_parallel_fs[dask]'`` works only once the package is
    on an index; from a checkout it is ``pip install '.[dask]'``. Both are
    given: in the demo's help, its error without Dask, and the scale-out page."""
    checkout = "pip install '.[dask]'"
    index = "pip install 'trio_parallel_fs[dask]'"
    helped = subprocess.run([sys.executable, "-m", "trio_parallel_fs", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0
    assert checkout in " ".join(helped.stdout.split())
    # As if distributed were not installed.
    code = (
        "import sys; sys.modules['distributed'] = None\n"
        "from trio_parallel_fs._extras.demo import main\n"
        "sys.exit(main(['--dask']))\n"
    )
    refused = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert checkout in refused.stderr and index in refused.stderr
    page = (Path(__file__).parent.parent / "docs" / "scaleout.rst").read_text()
    assert checkout in page and index in page


def test_the_demo_table_says_how_many_jobs_and_that_spawn_starts_nothing():
    from trio_parallel_fs._extras.demo import table

    row = {"start": 400.0, "warm": 0.1, "fresh": 5.0, "batch": 100.0}
    text = table({"forkserver": row, "spawn": dict(row, fresh=400.0)}, batch=16)
    assert "\nbatch of 16 numpy/scipy jobs, wall time " in text
    start_line = next(line for line in text.splitlines() if line.startswith("context start"))
    assert start_line.split()[-2:] == ["(none)", "*"]
    assert "* spawn has no template: opening its context starts no process" in text


# --- Dask's logs about our jobs (issue 22, item 9) ----------------------------

QUIET_PROGRAM = r"""
import logging, os, sys, time
import distributed, trio
import trio_parallel_fs
from trio_parallel_fs.dask import open_dask_context

def fail(x):
    raise ValueError(f"failed on {x}")

def die(code):
    os._exit(code)

def spin(path):
    with open(path, "w") as file:
        file.write(str(os.getpid()))
    while True:
        pass

def log_from_the_job():
    logging.getLogger("userjob").warning("the job's own warning")
    return os.getpid()

def say(text):
    print(f"--- {text}", file=sys.stderr, flush=True)

async def main(cluster, client, pid_file):
    logging.basicConfig(format="%(name)s %(levelname)s %(message)s")
    async with open_dask_context(client) as ctx:
        say("a job that raises")
        try:
            await ctx.run_sync(fail, 1)
        except ValueError:
            pass
        say("a job that kills its worker")
        try:
            await ctx.run_sync(die, 3)
        except trio_parallel_fs.BrokenWorkerError:
            pass
        await trio.to_thread.run_sync(lambda: client.wait_for_workers(2, timeout=60))
        say("kill_on_cancel")
        with trio.CancelScope() as scope:
            async def cancel_once_spinning():
                while not os.path.exists(pid_file) or not open(pid_file).read():
                    await trio.sleep(0.02)
                scope.cancel()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_once_spinning)
                await ctx.run_sync(spin, pid_file, kill_on_cancel=True)
        await trio.to_thread.run_sync(lambda: client.wait_for_workers(2, timeout=60))
        say("the user's own records")
        logging.getLogger("userapp").warning("the user's own warning")
        await ctx.run_sync(log_from_the_job)
        say("Dask's records about a task not ours")
        await trio.to_thread.run_sync(lambda: client.submit(fail, 2).exception())
        await trio.to_thread.run_sync(lambda: client.submit(die, 4).exception())
        await trio.to_thread.run_sync(lambda: client.wait_for_workers(2, timeout=60))
        say("done")
    print(" ".join(str(pid) for pid in client.run(os.getpid).values()), flush=True)

if __name__ == "__main__":  # the nannies spawn the workers, which import this file
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, dashboard_address=":0", scheduler_kwargs={"allowed_failures": 0}
    ) as cluster, distributed.Client(cluster, set_as_default=False) as client:
        trio.run(main, cluster, client, sys.argv[1])
"""


def test_dask_logs_nothing_about_our_jobs_but_keeps_other_records(tmp_path):
    """A LocalCluster's scheduler and nannies log in this process, its workers
    on our stderr. What they said about our jobs (a job that raises, one that
    kills its worker, a kill for kill_on_cancel) is gone; the user's own
    records, and Dask's about a task of someone else's, stay."""
    program = tmp_path / "quiet.py"
    program.write_text(QUIET_PROGRAM)
    out = subprocess.run(
        [sys.executable, str(program), str(tmp_path / "pid")],
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    ours, _, others = out.stderr.partition("--- Dask's records about a task not ours")
    assert "--- done" in others, out.stderr
    # Our jobs: none of Dask's words about them, nor their keys.
    for noise in ("Compute Failed", "marked as failed", "Restarting worker", "still alive", "Async instruction"):
        assert noise not in ours, out.stderr
    assert "trio_parallel_fs-" not in out.stderr, out.stderr
    # The user's own records, in this process and in a job.
    assert "userapp WARNING the user's own warning" in ours, out.stderr
    assert "the job's own warning" in ours, out.stderr
    # Someone else's task: Dask says what it says.
    assert others.count("Compute Failed") == 1, out.stderr
    assert others.count("Task die-") == 1 and "marked as failed because 1 workers died" in others, out.stderr
    assert others.count("Restarting worker") == 1, out.stderr
    # The cluster's worker processes are gone with the program.
    workers = {int(pid) for pid in out.stdout.split()}
    assert len(workers) == 2
    assert not wait_until_gone(workers, 10.0)


def log_record(name: str, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)


FAILED_TASK = "Task %s marked as failed because %d workers died while trying to run it"


def test_the_log_filter_drops_only_announced_nanny_lines_and_our_tasks(monkeypatch):
    """The rules of _dask_logs without a cluster: a clock of our own."""
    from trio_parallel_fs._backends.dask import logs as _dask_logs

    now = [1000.0]
    monkeypatch.setattr(_dask_logs.time, "monotonic", lambda: now[0])
    logs = _dask_logs.DaskLogFilter()
    logs.active = True
    restarting = log_record("distributed.nanny", "Restarting worker (status=%s)", "Status.running")
    alive = log_record("distributed.nanny", "Worker process still alive after 0.4 seconds, killing")
    # Nothing announced: the nanny's lines stay.
    assert logs.filter(restarting) and logs.filter(alive)
    # Someone else's task stays; ours goes, and announces one restart, unless
    # one is announced already (the tasks one death failed together).
    assert logs.filter(log_record("distributed.scheduler", FAILED_TASK, "fail-1234", 1))
    assert not logs.filter(log_record("distributed.scheduler", FAILED_TASK, "trio_parallel_fs-f-1", 1))
    assert not logs.filter(log_record("distributed.scheduler", FAILED_TASK, "trio_parallel_fs-f-2", 1))
    assert logs.pending() == 1
    assert not logs.filter(restarting)
    assert logs.filter(restarting)
    # A kill of ours: each line once; a withdrawn or lapsed one drops nothing.
    # Another job of ours that the killed worker ran fails with it, and
    # announces no second restart.
    [still] = logs.expect(_dask_logs.STILL_ALIVE)
    logs.expect(_dask_logs.RESTARTING)
    assert not logs.filter(log_record("distributed.scheduler", FAILED_TASK, "trio_parallel_fs-g-1", 1))
    assert logs.pending(_dask_logs.RESTARTING) == 1
    logs.withdraw([still])
    assert logs.filter(alive)
    now[0] += _dask_logs.EXPECT_FOR + 1
    assert logs.filter(restarting) and logs.pending() == 0
    # Other records of these loggers, and records with other names, stay.
    assert logs.filter(log_record("distributed.nanny", "Nanny asking worker to close. Reason: %s", "ours"))
    assert logs.filter(log_record("userapp", "Restarting worker (status=%s)", "mine"))
    # With no context open, the scheduler's lines about our tasks stay too.
    logs.active = False
    assert logs.filter(log_record("distributed.scheduler", FAILED_TASK, "trio_parallel_fs-f-3", 1))


def test_the_worker_log_filter_drops_only_lines_about_our_tasks():
    from trio_parallel_fs._backends.dask.worker import WorkerLogFilter

    worker_filter = WorkerLogFilter()
    compute_failed = "Compute Failed\nKey:       %s\nState:     %s\n"
    ours = log_record("distributed.worker", compute_failed, "trio_parallel_fs-f-1", "executing")
    assert not worker_filter.filter(ours)
    assert worker_filter.filter(log_record("distributed.worker", compute_failed, "f-1", "executing"))
    assert worker_filter.filter(log_record("distributed.worker", compute_failed, ("f", 0), "executing"))
    cancelled = "Async instruction for <Task cancelled name=\"execute('{}')\" coro=<...>> ended with CancelledError"
    name = "distributed.worker.state_machine"
    assert not worker_filter.filter(log_record(name, cancelled.format("trio_parallel_fs-f-1")))
    assert worker_filter.filter(log_record(name, cancelled.format("f-1")))


# --- map and imap ------------------------------------------------------------------


async def test_map_runs_chunks_of_items_as_tasks_and_keeps_their_order(client):
    import mapfns

    with trio.fail_after(60):
        async with open_dask_context(client) as ctx:
            assert await ctx.map(mapfns.square, range(2000)) == [x * x for x in range(2000)]
            assert await ctx.map(pow, [2, 3], [3, 2]) == [8, 9]
            stats = ctx.statistics()
            async with ctx.imap(mapfns.square, iter(range(300)), ordered=False) as results:
                assert sorted([r async for r in results]) == [x * x for x in range(300)]
    # Batched: far fewer tasks than items.
    assert 2 <= stats.submitted_jobs < 200
    assert stats.running_jobs == 0


async def test_map_chunks_need_nothing_of_ours_on_the_workers(client):
    """The chunk runner travels by value: fresh Dask workers run a map without
    importing the library's worker package (they need not have it)."""
    import mapfns

    with trio.fail_after(120):
        await restart_all_workers(client)
        async with open_dask_context(client) as ctx:
            assert await ctx.map(mapfns.square, range(100), chunksize=10) == [x * x for x in range(100)]
            ours = await on_workers(client, eval, imported("_trio_parallel_fs_worker"))
    assert set(ours.values()) == {False}


def test_importing_the_dask_module_leaves_local_chunks_by_reference():
    """Before, ``trio_parallel_fs.dask`` registered the chunk runner's module
    with cloudpickle for the whole process, so every local map chunk carried
    the runner by value too (some 2 KB and 20 µs a chunk)."""
    import cloudpickle

    from _trio_parallel_fs_worker import _chunks

    assert "trio_parallel_fs.dask" in sys.modules
    assert pickle.loads(cloudpickle.dumps(_chunks.run_chunk)) is _chunks.run_chunk


async def test_map_runs_no_more_tasks_at_once_than_the_cluster_has_threads(client):
    import functools

    import mapfns

    most = 0

    async def watch(ctx) -> None:
        nonlocal most
        while True:
            most = max(most, ctx.statistics().running_jobs)
            await trio.sleep(0.001)

    with trio.fail_after(60):
        async with open_dask_context(client) as ctx:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch, ctx)
                got = await ctx.map(functools.partial(mapfns.sleep_then, 0.05), range(12), chunksize=1)
                nursery.cancel_scope.cancel()
    assert got == list(range(12))
    assert most == 2  # both threads used, never more


async def test_map_on_dask_raises_the_first_failing_item_with_its_index(client):
    import functools

    import mapfns

    with trio.fail_after(60):
        async with open_dask_context(client) as ctx:
            fn = functools.partial(mapfns.fail_on, frozenset({777, 1500}))
            with pytest.raises(ValueError, match=r"^item 777 is bad") as caught:
                await ctx.map(fn, range(3000))
            assert await ctx.map(mapfns.square, range(3)) == [0, 1, 4]
            assert ctx.statistics().running_jobs == 0
    assert caught.value.__notes__ == ["raised by mapfns.fail_on on item 777 of map (counting from 0)"]
    assert isinstance(caught.value.__cause__, trio_parallel_fs.RemoteTraceback)


async def test_map_on_dask_names_an_unpicklable_item_by_its_index(client):
    """Dask pickles a chunk as it submits it, and names the job's argument
    (the chunk's list of items): the map names the item, as locally."""
    import mapfns

    with trio.fail_after(60):
        async with open_dask_context(client) as ctx:
            items = [1, 2, 3, 4, 5, threading.Lock(), 7]
            with pytest.raises(pickle.PicklingError) as caught:
                await ctx.map(mapfns.square, items, chunksize=4)
            assert ctx.statistics().running_jobs == 0
    assert str(caught.value).startswith(
        "map cannot send mapfns.square to a worker: item 5 (lock) could not be pickled (TypeError: "
    )


async def test_map_on_a_closed_dask_context_is_refused(client):
    async with open_dask_context(client) as ctx:
        pass
    with pytest.raises(trio.ClosedResourceError, match="this Dask context is closed"):
        await ctx.map(pow, [1], [2])
    with pytest.raises(trio.ClosedResourceError, match="this Dask context is closed"):
        ctx.imap(pow, [1], [2])


# --- under asyncio ------------------------------------------------------------------------------


def test_map_and_imap_under_asyncio(client):
    """map and imap of a Dask context in asyncio.run: results in order, and
    the first failing item with its note. (Before the test below: a test
    after a kill_on_cancel under asyncio may find a worker not restarted.)"""
    import asyncio
    import functools

    import anyio
    import mapfns

    async def main():
        async with open_dask_context(client) as ctx:
            assert await ctx.map(mapfns.square, range(500)) == [x * x for x in range(500)]
            async with ctx.imap(pow, [2, 3], [3, 2], ordered=False) as results:
                assert sorted([r async for r in results]) == [8, 9]
            with pytest.raises(ValueError, match=r"^item 77 is bad") as caught:
                await ctx.map(functools.partial(mapfns.fail_on, frozenset({77})), range(300))
            assert caught.value.__notes__ == ["raised by mapfns.fail_on on item 77 of map (counting from 0)"]
            assert ctx.statistics().running_jobs == 0
            assert isinstance(ctx.limiter, anyio.CapacityLimiter)

    asyncio.run(asyncio.wait_for(main(), 90))


def test_under_asyncio_results_errors_and_both_cancellations(client, tmp_path):
    """The same context in a program started with asyncio.run, given the
    synchronous client (its loop in a thread): values, a job's error, a
    shielded call that a timeout lets finish (the CancelledError comes after
    it), and kill_on_cancel stopping the job's worker process."""
    import asyncio

    async def main():
        async with open_dask_context(client) as ctx:
            assert await ctx.run_sync(pow, 2, 10) == 1024
            with pytest.raises(JobFailed, match="job failed on 3"):
                await ctx.run_sync(fail, 3)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ctx.run_sync(nap, 1.0), 0.2)
            await spin_then_cancel_under_asyncio(ctx, tmp_path / "pid")
            stats = ctx.statistics()
            assert (stats.completed_jobs, stats.failed_jobs, stats.killed_jobs) == (2, 1, 1)
            assert stats.restarted_workers == 1
            assert "trio" not in type(ctx.limiter).__module__

    asyncio.run(asyncio.wait_for(main(), 90))


# --- under asyncio, on the program's own loop (an asynchronous Client) ----------------------


@pytest.fixture(params=["asyncio", "uvloop"])
def aio_run(request, uvloop_if_installed):
    """Run an async function in a new asyncio loop, or uvloop's."""
    if request.param == "uvloop" and uvloop_if_installed is None:
        pytest.skip("uvloop is not installed (the test extra has it, but not on Windows)")

    def run(async_fn, *args):
        options = {"use_uvloop": request.param == "uvloop"}
        return anyio.run(async_fn, *args, backend="asyncio", backend_options=options)

    return run


#: Threads of the module's LocalCluster, whose scheduler and nannies run in
#: this process: Dask's one offload thread of the process, which the
#: scheduler starts on its first graph; a nanny's, when it starts a worker
#: process (in place of one killed).
CLUSTER_THREADS = ("Dask-Offload", "AsyncProcess ", "QueueFeederThread")


def new_threads(before: set[threading.Thread]) -> list[str]:
    """Threads started since ``before`` that still run, but the cluster's (a
    Client's loop thread is "IO loop"; asyncio's executor's, "asyncio_0"...)."""
    return sorted(
        thread.name
        for thread in set(threading.enumerate()) - before
        if thread.is_alive() and not thread.name.startswith(CLUSTER_THREADS)
    )


def test_under_asyncio_an_address_gets_a_client_on_the_programs_loop_and_no_thread(aio_run, cluster, tmp_path):
    """Given an address under asyncio, the context connects an asynchronous
    Client on the running loop (no loop thread, no thread per call) and
    closes it at exit; values, a job's error, map and imap, a shielded call a
    timeout lets finish, kill_on_cancel stopping the job's worker process,
    and the statistics, as with a synchronous client."""
    import asyncio

    import mapfns

    async def main():
        before = set(threading.enumerate())
        async with open_dask_context(cluster.scheduler_address) as ctx:
            own = ctx.client
            assert own.asynchronous and own.loop.asyncio_loop is asyncio.get_running_loop()
            assert await ctx.run_sync(pow, 2, 10) == 1024
            with pytest.raises(JobFailed, match="^job failed on 3$") as caught:
                await ctx.run_sync(fail, 3)
            assert "in nested" in caught.value.__cause__.text
            assert await ctx.map(mapfns.square, range(500)) == [x * x for x in range(500)]
            async with ctx.imap(pow, [2, 3], [3, 2], ordered=False) as results:
                assert sorted([r async for r in results]) == [8, 9]
            # Shielded: the job runs to its end, then the timeout takes effect.
            completed = ctx.statistics().completed_jobs
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ctx.run_sync(nap, 1.0), 0.2)
            assert ctx.statistics().completed_jobs == completed + 1
            await spin_then_cancel_under_asyncio(ctx, tmp_path / "pid")
            assert new_threads(before) == []
            stats = ctx.statistics()
        assert own.status == "closed"
        assert new_threads(before) == []
        return stats

    stats = aio_run(main)
    assert (stats.failed_jobs, stats.killed_jobs, stats.restarted_workers, stats.running_jobs) == (1, 1, 1, 0)
    assert stats.scheduler_address == cluster.scheduler_address


def test_under_asyncio_an_asynchronous_client_passed_in_is_used_on_the_loop_and_stays_open(aio_run, cluster):
    """An asynchronous Client the program made on its loop: the context runs
    its jobs there (no thread), and leaves it open."""
    import asyncio

    async def main():
        before = set(threading.enumerate())
        async with distributed.Client(cluster.scheduler_address, asynchronous=True, set_as_default=False) as client:
            async with open_dask_context(client) as ctx:
                assert ctx.client is client
                assert await ctx.run_sync(pow, 2, 3) == 8
                # Shielded without kill_on_cancel: the job ends, then the cancellation.
                call = asyncio.ensure_future(ctx.run_sync(nap, 1.0))
                await asyncio.sleep(0.2)
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
                stats = ctx.statistics()
                assert new_threads(before) == []
            assert client.status == "running"
            assert await client.submit(pow, 2, 4) == 16
            with pytest.raises(anyio.ClosedResourceError, match="this Dask context is closed"):
                await ctx.run_sync(pow, 2, 3)
        return stats

    stats = aio_run(main)
    assert (stats.submitted_jobs, stats.completed_jobs, stats.killed_jobs, stats.running_jobs) == (2, 2, 0, 0)
    assert (stats.workers, stats.total_threads) == (2, 2)


def test_an_asynchronous_client_of_another_loop_is_refused(cluster):
    """Its coroutines run on its own loop only: under Trio any asynchronous
    client is refused, under asyncio one made on another loop."""
    import asyncio

    other = asyncio.new_event_loop()
    thread = threading.Thread(target=other.run_forever, name="the other loop")
    thread.start()

    async def connect():
        return await distributed.Client(cluster.scheduler_address, asynchronous=True, set_as_default=False)

    try:
        client = asyncio.run_coroutine_threadsafe(connect(), other).result(60)
        try:

            async def open_it():
                async with open_dask_context(client):
                    pass  # pragma: no cover

            with pytest.raises(
                TypeError, match=r"^open_dask_context under Trio needs a synchronous distributed\.Client"
            ):
                trio.run(open_it)
            with pytest.raises(
                TypeError,
                match=r"^the asynchronous distributed\.Client given to open_dask_context runs on another event loop",
            ):
                asyncio.run(open_it())
        finally:

            async def close():
                await client.close()

            asyncio.run_coroutine_threadsafe(close(), other).result(60)
    finally:
        other.call_soon_threadsafe(other.stop)
        thread.join()
        other.close()


def test_under_asyncio_a_local_cluster_of_the_programs_loop(aio_run):
    """A LocalCluster made on the program's loop (asynchronous=True, its
    workers in this process), and a client of its own on that loop."""

    async def main():
        async with distributed.LocalCluster(
            asynchronous=True, processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0"
        ) as cluster:
            async with open_dask_context(cluster.scheduler_address) as ctx:
                assert ctx.client.asynchronous
                assert await ctx.map(pow, [2, 3, 4], [2, 2, 2]) == [4, 9, 16]
                with pytest.raises(JobFailed, match="^job failed on 1$"):
                    await ctx.run_sync(fail, 1)
                assert ctx.limiter.total_tokens == 2
                stats = ctx.statistics()
            assert ctx.client.status == "closed"
        return stats

    stats = aio_run(main)
    assert (stats.workers, stats.total_threads, stats.failed_jobs, stats.running_jobs) == (1, 2, 1, 0)


def test_under_asyncio_a_wrong_address_is_named_and_leaves_no_thread(aio_run):
    """The same errors as under Trio; the half-made asynchronous client is
    closed (a cancelled connect's too), and no thread was started."""
    import asyncio

    async def main():
        before = set(threading.enumerate())
        with pytest.raises(
            ValueError,
            match=r"^open_dask_context could not read the Dask scheduler address '127\.0\.0\.1:8786x': invalid literal",
        ):
            async with open_dask_context("127.0.0.1:8786x"):
                pass  # pragma: no cover
        with pytest.raises(
            OSError,
            match=(
                rf"^open_dask_context could not connect to the Dask scheduler at '{UNREACHABLE}' "
                r"within connect_timeout=1\.5 s \(OSError: Timed out trying to connect"
            ),
        ):
            async with open_dask_context(UNREACHABLE, connect_timeout=1.5):
                pass  # pragma: no cover

        async def open_unreachable():
            async with open_dask_context(UNREACHABLE, connect_timeout=30):
                pass  # pragma: no cover

        with pytest.raises(TimeoutError):
            await asyncio.wait_for(open_unreachable(), 0.5)
        assert new_threads(before) == []

    aio_run(main)


def test_under_asyncio_a_failing_preload_raises_at_open_and_leaves_no_plugin(aio_run, cluster, client):
    async def main():
        with pytest.raises(ImportError, match=r"could not preload \['no_such_module_here'\] on the Dask workers"):
            async with open_dask_context(cluster.scheduler_address, preload=["no_such_module_here"]):
                pass  # pragma: no cover

    aio_run(main)
    assert not [name for name in client.run_on_scheduler(plugin_names) if "trio_parallel_fs" in name]
