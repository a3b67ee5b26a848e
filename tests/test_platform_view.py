"""The platform views (tests/platform_view) show what they promise, and the
library runs under them: a spawned worker starts where there is no fcntl.

These tests run the views in child interpreters; ``.ci/run`` runs the suite
itself under each view."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

VIEW_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "platform_view")


def run_under(view: str, program: str, **variables: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TPF_PLATFORM_VIEW=view, **variables)
    paths = [VIEW_FOLDER, os.path.dirname(VIEW_FOLDER), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    # The program itself is not covered by the view (a -c program is not one
    # of ours); the library and the tests' helper modules it imports are.
    return subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120, env=env, cwd=VIEW_FOLDER
    )


LOOK = """
import json, sys
import trio
from _trio_parallel_fs_worker import _page_plan, _shm
import trio_parallel_fs._backends.launch as launch
print(json.dumps({
    "real": sys.platform,
    "trio sees": trio._core._run.sys.platform,
    "library sees": launch.sys.platform,
    "os.name": launch.os.name,
    "fork": hasattr(launch.os, "fork"),
    "fcntl": _shm.fcntl is not None,
    "page_plan": _page_plan.supported(),
}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the views run on Linux")
@pytest.mark.parametrize(
    ("view", "platform", "os_name", "fork", "fcntl"),
    [("windows", "win32", "nt", False, False), ("macos", "darwin", "posix", True, True)],
)
def test_the_library_sees_the_view_and_trio_does_not(view, platform, os_name, fork, fcntl):
    done = run_under(view, LOOK)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen == {
        "real": "linux",
        "trio sees": "linux",
        "library sees": platform,
        "os.name": os_name,
        "fork": fork,
        "fcntl": fcntl,
        "page_plan": False,  # Linux only
    }


SPAWN = """
import trio, trio_parallel_fs as tpf, workerfns

async def main():
    async with tpf.open_worker_context(worker_type="spawn") as ctx:
        print(await ctx.run_sync(workerfns.platform_as_seen))
        print(await ctx.run_sync(workerfns.add, 1, 2))

trio.run(main)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the views run on Linux")
def test_a_spawned_worker_starts_where_there_is_no_fcntl():
    """The regression: _page_plan imported fcntl at its top, every worker
    imports _page_plan, so no spawned worker started on Windows."""
    done = run_under("windows", textwrap.dedent(SPAWN))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["('win32', False)", "3"]


SHM = """
import errno, os
from _trio_parallel_fs_worker import _shm
try:
    _shm._posixshmem.shm_open("/" + "x" * 31, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode=0o600)
except OSError as error:
    print("32 bytes refused:", error.errno == errno.ENAMETOOLONG)
area = _shm.SharedArea.create(1 << 20)  # no memfd there: shm_open, with a name that fits
print("area of", area.cap)
area.close()
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the views run on Linux")
def test_the_macos_view_limits_shm_names_and_areas_fit_in_them():
    done = run_under("macos", textwrap.dedent(SHM))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["32 bytes refused: True", f"area of {1 << 20}"]


THREADS = """
import threading
import numpy  # OpenBLAS starts its thread pool as it loads: threads Python does not know
from _trio_parallel_fs_worker import _template
print(_template.count_threads(), threading.active_count())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the views run on Linux")
def test_without_proc_the_template_still_counts_native_threads():
    """Off Linux there is no /proc/self/task; Python's own thread count would
    miss a BLAS pool, and the template would fork a multi-threaded process."""
    pytest.importorskip("numpy")
    env_threads = {"OPENBLAS_NUM_THREADS": "2"}
    done = run_under("macos", textwrap.dedent(THREADS), **env_threads)
    assert done.returncode == 0, done.stderr
    native, python = map(int, done.stdout.split())
    assert (native, python) == (2, 1)
