"""pytest-benchmark suites: ``python -m pytest bench/`` (the path is needed:
the repository's testpaths is tests/). Needs ``pip install '.[bench]'``.

Useful options: ``--benchmark-max-time=0.2`` for a shorter run,
``--benchmark-group-by=group`` (the default here groups by case), ``-k warm``
for one case, ``--benchmark-autosave`` / ``--benchmark-compare`` to track
changes. ``python -m bench`` is the side-by-side report, with ratios against
trio-parallel, anyio and the floors; these suites time the same cases, for
regression tracking.

Our contexts come from the plugin's leak-checked ``worker_context`` fixture
and are timed with its ``trio_benchmark``; the other systems come from the
``other`` fixture below, with the same adapters the runner uses.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import psutil
import pytest

import trio_parallel_fs._extras.pytest_plugin as tpf_plugin
from bench import systems


def pytest_configure(config: pytest.Config) -> None:
    # The plugin may already be loaded (entry point, or -p): register it only
    # if not, because pytest refuses a module registered under two names.
    if not config.pluginmanager.is_registered(tpf_plugin):
        config.pluginmanager.register(tpf_plugin, "trio_parallel_fs")


def pytest_sessionfinish(session: pytest.Session) -> None:
    # trio-parallel leaves multiprocessing's forkserver and resource tracker
    # running until interpreter exit; stop them so the run leaves nothing.
    systems.stop_mp_helpers()


def _session_helpers() -> set[int]:
    """Pids of multiprocessing's forkserver and resource tracker: they live for the session."""
    from multiprocessing import forkserver, resource_tracker

    pids = {
        getattr(forkserver._forkserver, "_forkserver_pid", None),
        getattr(resource_tracker._resource_tracker, "_pid", None),
    }
    return {pid for pid in pids if pid}


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Any:
    """Fail a benchmark whose system left a process behind (ours are also checked,
    more precisely, by worker_context itself)."""
    before = {proc.pid for proc in psutil.Process().children(recursive=True)}
    yield
    deadline = time.monotonic() + 10
    while True:
        left = [
            proc
            for proc in psutil.Process().children(recursive=True)
            if proc.pid not in before and proc.pid not in _session_helpers()
        ]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"processes left behind: {[proc.pid for proc in left]}"


@pytest.fixture
async def other(request: pytest.FixtureRequest) -> AsyncIterator[systems.Caller]:
    """A system other than ours, by its name in bench.systems.SYSTEMS (indirect parameter)."""
    async with systems.SYSTEMS[request.param][1]() as caller:
        yield caller
