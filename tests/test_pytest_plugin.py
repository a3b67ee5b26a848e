"""The pytest plugin: the leak-checking worker_context fixture and trio_benchmark.

Each test writes a small test suite and runs it with pytest in a subprocess
(pytester), then checks the outcomes. A subprocess keeps the inner runs'
processes, warnings and default context apart from this run's own checks; the
autouse fixture in conftest.py still proves the inner run left nothing behind.
No test here depends on how fast anything is: the benchmark tests measure
Trio's virtual time (autojump_clock), where a sleep lasts exactly its length.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytest_plugins = ["pytester"]

PLUGIN = "trio_parallel_fs._extras.pytest_plugin"


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    # The inner runs get their own ini: pytest-trio's trio mode, nothing else
    # from this repository's configuration.
    pytester.makeini("[pytest]\ntrio_mode = true\naddopts = -p no:cacheprovider\n")
    return pytester


def plugin_args() -> tuple[str, ...]:
    """``-p`` for the plugin, unless the installed package's pytest11 entry point
    loads it already (pytest refuses one module registered under two names)."""
    entry_points = importlib.metadata.entry_points(group="pytest11")
    if any(entry.value.split(":")[0] == PLUGIN for entry in entry_points):
        return ()
    return ("-p", PLUGIN)


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*plugin_args(), "-rA", *args, timeout=300)


# Indented as the inner file is, which pytester dedents whole.
TEMPLATE_TAKES_PROCESSES_DOWN = """

        async def test_the_template_takes_a_jobs_process_down(worker_context):
            await worker_context.run_sync(start_a_process_and_leave_it)

        @pytest.mark.worker_context(template_init=start_a_process_and_leave_it)
        async def test_the_template_takes_its_own_process_down(worker_context):
            await worker_context.run_sync(os.getpid)
"""


def test_clean_contexts_pass_and_leaks_fail(
    inner: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process a job leaves running in a session of its own: the template
    takes it down when a forkserver context closes, so that test passes; a
    spawned worker has no template, so it outlives the context, and the fixture
    must find it, name it, kill it and error the test. The one white-box case
    stands for a bug in the context's own shutdown."""
    leftovers = tmp_path / "leftovers"
    # Only Linux's template adopts what its workers leave (a subreaper).
    template_cases = TEMPLATE_TAKES_PROCESSES_DOWN if sys.platform.startswith("linux") else ""
    inner.makepyfile(
        test_inner="""
        import os
        import pytest

        @pytest.mark.parametrize("worker_context", [{}, {"worker_type": "spawn"}], indirect=True)
        async def test_clean(worker_context):
            assert await worker_context.run_sync(os.getpid) != os.getpid()

        @pytest.fixture
        def worker_context_leak_timeout():
            return 2.0  # everything is reaped by the time the context has closed

        def start_a_process_and_leave_it():
            # In its own session, out of the worker's process group: a daemon.
            import os, subprocess, psutil
            proc = subprocess.Popen(
                ["sleep", "300"], start_new_session=True, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            with open(os.environ["LEFTOVERS"], "a") as file:
                file.write(f"{proc.pid} {psutil.Process(proc.pid).create_time()}\\n")

        @pytest.mark.worker_context(worker_type="spawn")
        async def test_a_spawned_workers_job_leaves_a_process(worker_context):
            await worker_context.run_sync(start_a_process_and_leave_it)

        async def test_a_context_that_does_not_close(worker_context):
            await worker_context.run_sync(os.getpid)
            # Stand-in for a bug in the context's shutdown: the close the
            # fixture calls does nothing, so the template and workers stay.
            worker_context._close_blocking = lambda: None
        """
        + template_cases
    )
    monkeypatch.setenv("LEFTOVERS", str(leftovers))
    result = run(inner)
    # A teardown error counts on top of the pass.
    result.assert_outcomes(passed=6 if template_cases else 4, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_a_spawned_workers_job_leaves_a_process*",
            "*1 process(es) of the worker context outlived it (still there 2.0s after it closed; now killed):",
            "  pid [0-9]* (parent [0-9]*, *): sleep 300",
            "Stop what a job or hook starts before the context closes; *",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_a_context_that_does_not_close*",
            "*process(es) of the worker context outlived it*",
            "* template [0-9]*" if sys.platform != "win32" else "* worker loopback:[0-9]*",
        ]
    )
    passed = [
        "PASSED test_inner.py::test_clean[[]worker_context0[]]",
        "PASSED test_inner.py::test_clean[[]worker_context1[]]",
    ]
    if template_cases:
        passed += [
            "PASSED test_inner.py::test_the_template_takes_a_jobs_process_down",
            "PASSED test_inner.py::test_the_template_takes_its_own_process_down",
        ]
    result.stdout.fnmatch_lines(passed)
    # Nothing outlives the run: the template took two down (Linux), the
    # fixture killed the one it reported.
    started = [line.split() for line in leftovers.read_text().splitlines()]
    assert len(started) == (3 if template_cases else 1)
    for pid, create_time in started:
        assert not still_running(int(pid), float(create_time)), f"leftover {pid} is still running"


def still_running(pid: int, create_time: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == create_time and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_marker_and_parameter_configure_the_context(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        test_inner="""
        import os
        import pytest
        import trio

        @pytest.mark.worker_context(max_jobs=1, idle_timeout=30)
        def test_marker_in_a_sync_test(worker_context):
            # A plain test may run trio itself, more than once, on the same context.
            first = trio.run(worker_context.run_sync, os.getpid)
            second = trio.run(worker_context.run_sync, os.getpid)
            assert first != second  # max_jobs=1: a fresh worker per job
            assert worker_context.statistics().retired == {"jobs": 2}
            assert worker_context.idle_timeout == 30

        @pytest.mark.worker_context(max_jobs=1, worker_type="spawn")
        @pytest.mark.parametrize("worker_context", [{"max_jobs": 2}], indirect=True)
        async def test_parameter_overrides_marker(worker_context):
            assert worker_context.max_jobs == 2
            assert worker_context.worker_type.value == "spawn"
            assert worker_context.statistics().template_pid is None

        @pytest.mark.worker_context(preload=["a_module_that_does_not_exist"])
        async def test_failing_preload_errors_at_setup(worker_context):
            raise AssertionError("not reached")
        """
    )
    result = run(inner)
    # On Windows too (no template): the first spawned worker preloads at the set-up.
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_failing_preload_errors_at_setup*",
            "*TemplateStartError*a_module_that_does_not_exist*",
        ]
    )


def test_trio_benchmark_times_only_the_awaited_call(inner: pytest.Pytester) -> None:
    pytest.importorskip("pytest_benchmark", reason="trio_benchmark drives pytest-benchmark")
    inner.makepyfile(
        test_inner="""
        import pytest
        import trio

        async def test_plain(trio_benchmark, autojump_clock):
            result = await trio_benchmark(trio.sleep, 1.5)
            assert result is None
            stats = trio_benchmark.stats.stats
            assert stats.rounds >= 5  # pytest-benchmark's min_rounds
            assert stats.min == pytest.approx(1.5, abs=1e-6)
            assert stats.max == pytest.approx(1.5, abs=1e-6)

        async def test_pedantic_excludes_setup_and_teardown(trio_benchmark, autojump_clock):
            calls = []

            async def setup():
                await trio.sleep(10)  # would dominate the figures if it were timed
                calls.append("setup")
                return (0.25,), {}

            def teardown(seconds):
                calls.append("teardown")

            async def target(seconds):
                await trio.sleep(seconds)
                return "done"

            result = await trio_benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=3)
            assert result == "done"
            assert calls == ["setup", "teardown"] * 3
            stats = trio_benchmark.stats.stats
            assert stats.rounds == 3
            assert stats.min == pytest.approx(0.25, abs=1e-6)
            assert stats.max == pytest.approx(0.25, abs=1e-6)

        async def test_iterations_are_divided_out(trio_benchmark, autojump_clock):
            await trio_benchmark.pedantic(trio.sleep, args=(0.5,), rounds=2, iterations=4)
            assert trio_benchmark.stats.stats.mean == pytest.approx(0.5, abs=1e-6)

        async def test_exceptions_propagate(trio_benchmark):
            async def fail():
                raise KeyError("boom")
            with pytest.raises(KeyError, match="boom"):
                await trio_benchmark(fail)

        async def test_sync_functions_are_refused(trio_benchmark):
            with pytest.raises(TypeError, match="not an awaitable"):
                await trio_benchmark(len, "abc")
        """
    )
    result = run(inner, "--benchmark-disable-gc")
    result.assert_outcomes(passed=5)


def test_trio_benchmark_records_run_sync_timings(inner: pytest.Pytester) -> None:
    pytest.importorskip("pytest_benchmark", reason="trio_benchmark drives pytest-benchmark")
    inner.makepyfile(
        test_inner="""
        import os
        import pytest

        @pytest.mark.benchmark(max_time=0.05, min_rounds=3)
        @pytest.mark.parametrize("worker_context", [{}, {"worker_type": "spawn"}], indirect=True)
        async def test_warm_call(trio_benchmark, worker_context):
            await worker_context.run_sync(os.getpid)
            pid = await trio_benchmark(worker_context.run_sync, os.getpid)
            assert pid != os.getpid()
            assert worker_context.statistics().started_workers == 1
        """
    )
    report = inner.path / "bench.json"
    result = run(inner, f"--benchmark-json={report}")
    result.assert_outcomes(passed=2)
    data = json.loads(report.read_text())
    benchmarks = {entry["param"]: entry for entry in data["benchmarks"]}
    assert set(benchmarks) == {"worker_context0", "worker_context1"}
    for entry in benchmarks.values():
        assert entry["options"]["timer"] == "awaited_time"
        assert entry["stats"]["rounds"] >= 3
        assert 0 < entry["stats"]["min"] <= entry["stats"]["median"] <= entry["stats"]["max"]


def test_trio_benchmark_keeps_the_tests_benchmark_options(inner: pytest.Pytester) -> None:
    """The awaited-time clock reaches pytest-benchmark through the test's own
    ``benchmark`` marker; the other options there still apply, and a ``timer``
    given there (or on the command line) is replaced."""
    pytest.importorskip("pytest_benchmark", reason="trio_benchmark drives pytest-benchmark")
    inner.makepyfile(
        test_inner="""
        import time
        import pytest
        import trio

        @pytest.mark.benchmark(min_rounds=7, max_time=0.5, group="sleeps", timer=time.time)
        async def test_options(trio_benchmark, autojump_clock):
            await trio_benchmark(trio.sleep, 0.25)
            stats = trio_benchmark.stats.stats
            assert stats.rounds >= 7
            assert stats.min == pytest.approx(0.25, abs=1e-6)
            assert trio_benchmark.benchmark.group == "sleeps"
        """
    )
    report = inner.path / "bench.json"
    result = run(inner, "--benchmark-timer=time.process_time", f"--benchmark-json={report}")
    result.assert_outcomes(passed=1)
    (entry,) = json.loads(report.read_text())["benchmarks"]
    assert entry["options"]["timer"] == "awaited_time"
    assert entry["options"]["max_time"] == 0.5
    assert entry["group"] == "sleeps"


def test_trio_benchmark_tests_are_benchmarks_for_only_skip_autosave_and_compare(inner: pytest.Pytester) -> None:
    """pytest-benchmark sorts tests into benchmarks and others at collection,
    by whether ``benchmark`` is among their fixtures: a ``trio_benchmark``
    test must count as a benchmark there, so that ``--benchmark-only`` runs it
    (and skips the others), ``--benchmark-skip`` skips it, and its figures are
    saved and compared like any benchmark's."""
    pytest.importorskip("pytest_benchmark", reason="trio_benchmark drives pytest-benchmark")
    inner.makepyfile(
        test_inner="""
        import pytest
        import trio

        @pytest.fixture
        def seconds():
            return 0.25

        @pytest.mark.benchmark(min_rounds=3, max_time=0.1)
        async def test_awaited(trio_benchmark, autojump_clock):
            await trio_benchmark(trio.sleep, 0.5)
            assert trio_benchmark.stats.stats.min == pytest.approx(0.5, abs=1e-6)

        @pytest.mark.benchmark(min_rounds=3, max_time=0.1)
        @pytest.mark.parametrize("factor", [1, 2])
        async def test_through_a_fixture(trio_benchmark, autojump_clock, seconds, factor):
            await trio_benchmark(trio.sleep, seconds * factor)
            assert trio_benchmark.stats.stats.min == pytest.approx(seconds * factor, abs=1e-6)

        def test_not_a_benchmark():
            pass
        """
    )
    benchmarks = [
        "test_inner.py::test_awaited",
        "test_inner.py::test_through_a_fixture[[]1[]]",
        "test_inner.py::test_through_a_fixture[[]2[]]",
    ]
    result = run(inner, "--benchmark-only", "--benchmark-autosave")
    result.assert_outcomes(passed=3, skipped=1)
    result.stdout.fnmatch_lines_random([f"PASSED {name}" for name in benchmarks])
    result.stdout.fnmatch_lines(["SKIPPED * Skipping non-benchmark (--benchmark-only active)."])
    (saved,) = (inner.path / ".benchmarks").rglob("0001_*.json")
    names = {entry["name"]: entry for entry in json.loads(saved.read_text())["benchmarks"]}
    assert set(names) == {"test_awaited", "test_through_a_fixture[1]", "test_through_a_fixture[2]"}
    assert names["test_awaited"]["options"]["timer"] == "awaited_time"
    assert names["test_awaited"]["stats"]["min"] == pytest.approx(0.5, abs=1e-6)

    # Compared with the saved run: the same figures (virtual time), so a
    # regression threshold of 1% passes.
    result = run(inner, "--benchmark-only", "--benchmark-compare=0001", "--benchmark-compare-fail=min:1%")
    result.assert_outcomes(passed=3, skipped=1)
    result.stderr.fnmatch_lines(["Comparing against benchmarks from: *0001_*.json"])
    result.stdout.fnmatch_lines(["test_awaited (0001_*)*", "test_awaited (NOW)*"], consecutive=False)
    assert "Performance has regressed" not in result.stdout.str()

    result = run(inner, "--benchmark-skip")
    result.assert_outcomes(passed=1, skipped=3)
    result.stdout.fnmatch_lines(["PASSED test_inner.py::test_not_a_benchmark"])


def test_trio_benchmark_refuses_a_test_that_also_uses_benchmark(inner: pytest.Pytester) -> None:
    pytest.importorskip("pytest_benchmark", reason="trio_benchmark drives pytest-benchmark")
    inner.makepyfile(
        test_inner="""
        async def test_both(benchmark, trio_benchmark):
            raise AssertionError("not reached")
        """
    )
    result = run(inner)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["test_both uses both benchmark and trio_benchmark; *one benchmark per test*"])


def test_trio_benchmark_without_pytest_benchmark_says_what_to_install(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        test_inner="""
        import trio

        async def test_needs_it(trio_benchmark):
            await trio_benchmark(trio.sleep, 0)
        """
    )
    # -p no:benchmark: as if pytest-benchmark were not installed.
    result = run(inner, "-p", "no:benchmark")
    result.assert_outcomes(errors=1)
    error = result.stdout.str().split("ERROR at setup of test_needs_it")[1].split("short test summary")[0]
    lines = [line for line in error.splitlines() if line.strip("=_ ")]
    assert lines == [
        "trio_benchmark needs pytest-benchmark, which is not installed or not loaded "
        "(-p no:benchmark): pip install pytest-benchmark"
    ]


def test_loading_the_plugin_imports_nothing_more() -> None:
    """pytest loads the plugin into every session of every environment that has
    trio_parallel_fs installed: importing it must not pull in psutil,
    pytest-benchmark or the package's machinery beyond what the package itself
    imports; the fixtures import those when a test uses them."""
    code = (
        "import sys, pytest, trio_parallel_fs\n"
        "before = set(sys.modules)\n"
        f"import {PLUGIN}\n"
        "print(sorted(set(sys.modules) - before))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # Its package (_extras) is a docstring and nothing else.
    assert out.strip() == repr(sorted([PLUGIN, PLUGIN.rsplit(".", 1)[0]]))


def test_loading_the_plugin_imports_neither_trio_nor_the_library() -> None:
    """pytest imports the plugin in every session of every user: with the
    package's names loaded on first use, that pulls in neither trio nor any
    of the library's own modules."""
    code = (
        "import sys, pytest\n"
        f"import {PLUGIN}\n"
        "print(sorted(name for name in sys.modules if name == 'trio' or name.startswith('trio_parallel_fs.')"
        " or name.startswith('_trio_parallel_fs_worker')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == repr(sorted([PLUGIN, PLUGIN.rsplit(".", 1)[0]]))  # the plugin and its empty package
