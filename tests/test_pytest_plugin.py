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

import pytest

pytest_plugins = ["pytester"]

PLUGIN = "trio_parallel_fs._pytest_plugin"


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


def test_clean_contexts_pass_and_leaks_fail(inner: pytest.Pytester) -> None:
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

        STOLEN = []

        @pytest.mark.worker_context(worker_type="spawn")
        async def test_leaks_a_spawned_worker(worker_context):
            await worker_context.run_sync(os.getpid)
            # Take the idle worker out of the pool with its channel open: the
            # context cannot close it, so the worker outlives the context.
            STOLEN.append(worker_context._pool._idle.pop())

        async def test_leaks_the_template(worker_context):
            await worker_context.run_sync(os.getpid)
            # Break the template's shutdown for this context only.
            worker_context._pool._backend.close = lambda timeout: None
        """
    )
    result = run(inner)
    result.assert_outcomes(passed=4, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks_a_spawned_worker*",
            "*1 process(es) of the worker context outlived it*",
            "* worker [0-9]* --die-with-parent *",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks_the_template*",
            "*outlived it*",
            "* template [0-9]*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "PASSED test_inner.py::test_clean[[]worker_context0[]]",
            "PASSED test_inner.py::test_clean[[]worker_context1[]]",
        ]
    )
    result.stdout.no_fnmatch_line("ERROR*test_clean*")


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
