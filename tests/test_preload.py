"""A failing preload raises when the context opens, whatever starts the
workers: the template, or (``SPAWN``, all there is on Windows) the first
worker, which imports the preload itself and starts at the open for that."""

from __future__ import annotations

import contextlib
import os

import pytest
import workerfns

import trio_parallel_fs as tpf


@contextlib.contextmanager
def in_a_removed_directory(tmp_path):
    """In a working directory that no longer exists; back where we were
    after (also given, so that a test can go back earlier)."""
    here = os.getcwd()
    gone = tmp_path / "gone"
    gone.mkdir()
    os.chdir(gone)
    try:
        gone.rmdir()
        yield here
    finally:
        os.chdir(here)


async def test_a_failing_preload_raises_at_open_whatever_starts_the_workers(worker_type):
    """Spawned workers (all there is on Windows) import the preload themselves.
    Before, a failing one raised only at the first call, as a WorkerHookError
    ("the worker could not start"), and the open succeeded; now the open
    raises TemplateStartError with the import error, as with the template."""
    with pytest.raises(
        tpf.TemplateStartError,
        match=r"could not preload \['workerfns', 'no_such_module_for_tpf'\]: "
        r"ModuleNotFoundError: No module named 'no_such_module_for_tpf'$",
    ) as info:
        async with tpf.open_worker_context(worker_type=worker_type, preload=["workerfns", "no_such_module_for_tpf"]):
            pytest.fail("the open must raise")
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    with pytest.raises(tpf.TemplateStartError, match="ImportError: preload_broken fails to import on purpose$") as info:
        async with tpf.open_worker_context(worker_type=worker_type, preload=["preload_broken"]):
            pytest.fail("the open must raise")
    assert isinstance(info.value.__cause__, ImportError)


async def test_a_failing_template_init_raises_at_open_whatever_starts_the_workers(worker_type):
    with pytest.raises(
        tpf.TemplateStartError, match="could not run template_init: RuntimeError: init failed on purpose$"
    ) as info:
        async with tpf.open_worker_context(worker_type=worker_type, template_init=workerfns.init_raises):
            pytest.fail("the open must raise")
    assert isinstance(info.value.__cause__, RuntimeError)


async def test_a_preload_that_ends_its_process_raises_at_open_naming_the_exit_code(worker_type):
    who = "the template process" if worker_type == "forkserver" else "a worker"
    with pytest.raises(
        tpf.TemplateStartError,
        match=rf"^{who} \(pid \d+\) exited with exit code 3 while preloading \['preload_exits'\]; see its output",
    ):
        async with tpf.open_worker_context(worker_type=worker_type, preload=["preload_exits"]):
            pytest.fail("the open must raise")


async def test_the_spawned_worker_that_preloaded_at_open_takes_the_first_job():
    async with tpf.open_worker_context(
        worker_type="spawn", preload=["preload_marker"], init=workerfns.count_calls
    ) as ctx:
        stats = ctx.statistics()
        assert (stats.prepared_workers, stats.idle_workers, stats.started_workers) == (1, 0, 0)
        [ready] = ctx._pool.worker_pids()
        assert await ctx.run_sync(workerfns.imported, "preload_marker") is True
        assert await ctx.run_sync(workerfns.pid) == ready
        assert await ctx.run_sync(workerfns.count_calls) == 2  # its init ran once, at the open
        stats = ctx.statistics()
        assert (stats.prepared_workers, stats.idle_workers, stats.started_workers) == (0, 1, 1)


async def test_without_a_preload_a_spawned_context_starts_no_worker_at_open():
    async with tpf.open_worker_context(worker_type="spawn") as ctx:
        assert ctx._pool.worker_pids() == []
        assert ctx.statistics().prepared_workers == 0


async def test_an_init_hook_that_raises_is_the_first_calls_to_report_even_with_a_preload(worker_type):
    """The spawned worker started at open runs its init hook there too; its
    failure is still reported by the first call, as with the template."""
    async with tpf.open_worker_context(
        worker_type=worker_type, preload=["preload_marker"], init=workerfns.init_raises
    ) as ctx:
        with pytest.raises(tpf.WorkerHookError, match="init hook raised RuntimeError: init failed on purpose") as info:
            await ctx.run_sync(workerfns.add, 1, 2)
        assert info.value.hook == "init"
        assert ctx.statistics().retired == {"hook_error": 1}  # the failure at the open is not counted twice


async def test_the_default_context_raises_a_failing_preload_at_the_first_call(worker_type):
    tpf.configure_default_context(worker_type=worker_type, preload=["no_such_module_for_tpf"])
    for _ in range(2):  # and again at the next: nothing was kept of the failed start
        with pytest.raises(tpf.TemplateStartError, match="No module named 'no_such_module_for_tpf'$"):
            await tpf.run_sync(workerfns.add, 1, 2)
    tpf.configure_default_context(worker_type=worker_type, preload=["preload_exits"])
    with pytest.raises(tpf.TemplateStartError, match=r"exited with exit code 3 while preloading \['preload_exits'\]"):
        await tpf.run_sync(workerfns.add, 1, 2)


@pytest.mark.parametrize("preload", [[], ["preload_marker"]])
async def test_a_context_opens_in_a_working_directory_that_was_removed(worker_type, preload, tmp_path):
    """The open makes no worker's settings where it starts none; where it
    does (spawned, with a preload), the first call's start is left to say
    what is wrong, as before the first worker started at the open."""
    with in_a_removed_directory(tmp_path) as here:
        async with tpf.open_worker_context(worker_type=worker_type, preload=preload) as ctx:
            os.chdir(here)
            assert await ctx.run_sync(workerfns.add, 1, 2) == 3


async def test_a_later_worker_that_dies_preloading_is_a_broken_worker_not_a_failed_start(tmp_path, monkeypatch):
    """Once a worker of the context has preloaded, the preload is known to
    load: a later worker that dies before saying so (killed, out of memory)
    is a BrokenWorkerError, which retry code catches, not a TemplateStartError."""
    marker = tmp_path / "exit-now"
    monkeypatch.setenv("TPF_TEST_EXIT_MARKER", str(marker))
    async with tpf.open_worker_context(worker_type="spawn", preload=["preload_exits_when_told"], max_jobs=1) as ctx:
        assert await ctx.run_sync(workerfns.add, 1, 2) == 3
        marker.touch()
        with pytest.raises(tpf.BrokenWorkerError, match="died with exit code 9") as info:
            await ctx.run_sync(workerfns.add, 1, 2)
        assert info.value.exitcode == 9


async def test_a_call_in_a_removed_working_directory_says_so_and_leaves_no_worker(worker_type, tmp_path):
    async with tpf.open_worker_context(worker_type=worker_type) as ctx:
        with in_a_removed_directory(tmp_path):
            with pytest.raises(FileNotFoundError, match="working directory was removed"):
                await ctx.run_sync(workerfns.add, 1, 2)
        assert ctx._pool.worker_pids() == []
        assert await ctx.run_sync(workerfns.add, 1, 2) == 3
