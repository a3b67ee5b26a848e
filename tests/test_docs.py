"""The documentation: every example script runs and prints what the docs say,
and the docs build without warnings.

Each example in docs/examples runs in its own interpreter, as a reader would
run it. Its processes carry a marker in their environment (templates and
workers inherit it), so that a process left behind is found even after it was
re-parented away from us.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

import trio_parallel_fs

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
# Modules the scripts import; not scripts themselves.
HELPERS = {"jobs.py", "bigtable.py", "app.py"}
MARKER = "TRIO_PARALLEL_FS_DOCS_EXAMPLE"


def scripts() -> list[str]:
    return sorted(p.name for p in EXAMPLES.glob("*.py") if p.name not in HELPERS)


def marked_processes(token: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == token:
                found.append(proc)
        except (psutil.Error, OSError):
            continue  # gone, a zombie, or not ours to read
    return found


def run_example(name: str, *args: str, timeout: float = 60) -> str:
    """Run an example script; return its stdout. Fails on a non-zero exit,
    on anything written to stderr, and on processes left behind."""
    token = uuid.uuid4().hex
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", **{MARKER: token})
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run(
        [sys.executable, "-W", "error", name, *args],
        cwd=EXAMPLES,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{name} exited with {proc.returncode}:\n{proc.stderr}"
    assert proc.stderr == "", f"{name} wrote to stderr:\n{proc.stderr}"
    deadline = time.monotonic() + 5
    while (left := marked_processes(token)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"{name} left processes behind: {[p.cmdline() for p in left]}"
    return proc.stdout


def values(pattern: str, text: str) -> tuple[str, ...]:
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"no line matches {pattern!r} in:\n{text}"
    return match.groups()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --- one check per example --------------------------------------------------


def check_quickstart(out: str) -> None:
    assert "crunch(1000) = 332833500\n" in out
    results = [sum(i * i for i in range(10**k)) for k in (3, 4, 5, 6)]
    assert f"results: {results}\n" in out
    (slots,) = values(r"^CPU slots: (\d+)$", out)
    assert int(slots) == usable_cpus()
    (started,) = values(r"^workers started: (\d+)$", out)
    (idle,) = values(r"^idle workers: (\d+)$", out)
    # Never more workers than jobs may run at once; all of them idle now.
    assert 1 <= int(started) <= int(slots)
    assert idle == started


def check_preload(out: str) -> None:
    assert out == (
        "preloaded: ('jobs',)\n"
        "jobs was imported by the template: True\n"
        "the job ran in another process: True\n"
        "trio is loaded in the worker: False\n"
    )


def check_preload_cost(out: str) -> None:
    cold, warm = values(
        r"^fresh worker, app not preloaded: ([\d.]+) ms\nfresh worker, app preloaded: ([\d.]+) ms$", out
    )
    # Importing trio costs some 100 ms; a fork costs a few. The margin is wide.
    assert float(warm) < float(cold)


def check_recycling(out: str) -> None:
    assert "max_jobs=2, 6 jobs: workers started 3, retired {'jobs': 3}\n" in out
    assert "blocks held after each call: [1, 2, 3, 1, 2, 3]\n" in out
    assert "max_memory=50 MiB: workers started 2, retired {'memory': 2}\n" in out
    for metric, started, retired in [("uss", 1, "{}"), ("rss", 4, "{'memory': 4}")]:
        uss_text, pss_text, rss_text = values(
            rf"^memory_metric='{metric}': USS (\d+) MiB, PSS (\d+ MiB|n/a \(Linux only\)), RSS (\d+) MiB$", out
        )
        uss, rss = int(uss_text), int(rss_text)
        # The 64 MiB table is in every worker's RSS, half of it in PSS (two
        # processes share it), and none of it in USS.
        assert uss < 40 < 64 <= rss
        if sys.platform.startswith("linux"):
            assert uss < int(pss_text.split()[0]) < rss
        else:
            assert pss_text == "n/a (Linux only)"
        assert (
            f"memory_metric='{metric}': USS {uss} MiB, PSS {pss_text}, RSS {rss} MiB\n"
            f"  4 jobs: workers started {started}, retired {retired}\n" in out
        )
    # Only the RSS limit is below what a fresh worker uses: warned once.
    assert out.count("  warning: ") == 1
    assert (
        "retired {'memory': 4}\n  warning: max_memory=40.0 MiB is below what a fresh worker "
        "of this context uses before any job\n" in out
    )
    assert "idle_timeout=0.2: idle workers 0, retired {'idle': 1}\n" in out
    assert "squares: [1, 4, 9, 16, 25, 36]\n" in out
    assert "retire hook: workers started 2, retired {'user': 2}\n" in out


def check_kill_on_cancel(out: str) -> None:
    assert "shielded job returned: finished\ncancelled at the next checkpoint: True\n" in out
    assert "this line is not reached" not in out
    assert "killed job cancelled: True\n" in out
    (seconds,) = values(r"^seconds until the call returned: ([\d.]+)$", out)
    assert float(seconds) < 10  # the job would have slept for 30
    assert out.endswith("retired: {'killed': 1}\n")


def check_broken_worker(out: str) -> None:
    (pid,) = values(
        r"^BrokenWorkerError: worker process (\d+) died with signal SIGKILL while running "
        r"jobs\.get_oom_killed \(.*OOM killer.*\)\.$",
        out,
    )
    assert int(pid) > 0
    assert (
        "signal_name: SIGKILL\n"
        "exitcode: -9\n"
        "function: jobs.get_oom_killed\n"
        "template_died: False\n"
        "next call: 332833500\n"
        "retired: {'died': 1}\n"
    ) in out


def check_errors(out: str) -> None:
    assert (
        "ValueError: invalid literal for int() with base 10: 'forty-two'\n"
        "cause: RemoteTraceback\n"
        "worker frame shown: True\n"
    ) in out
    assert re.search(
        r"^PicklingError: cannot send jobs\.crunch to a worker: argument 0 \(lock\) could not be pickled",
        out,
        re.MULTILINE,
    )
    used, ceiling = map(int, values(r"^MemoryCeilingError: used (\d+) MiB, ceiling (\d+) MiB$", out))
    assert ceiling == 100 and used >= 100
    assert "signal_name: SIGKILL\nretired: {'ceiling': 1}\n" in out
    assert "WorkerHookError: hook 'init'\ncause: ConnectionError('no database at db.invalid:5432')\n" in out
    assert re.search(
        r"^TemplateStartError: .*no_such_module.*\n"
        r"cause: ModuleNotFoundError\(\"No module named 'no_such_module'\"\)$",
        out,
        re.MULTILINE,
    )


def check_spawn(out: str) -> None:
    assert out == (
        "template: None\n"
        "jobs was imported by the worker itself: True\n"
        "the worker is our child: True\n"
        "crunch(1000) = 332833500\n"
    )


MIGRATE_OUTPUT = (
    "default limiter is a CapacityLimiter: True\n"
    "run_sync: 332833500\n"
    "with a limiter: 285\n"
    "cancellable=True cancelled: True\n"
    "kill_on_cancel=True cancelled: True\n"
    "BrokenWorkerError caught\n"
    "default context running workers: 0\n"
    "a WorkerContext: True\n"
    "its idle_timeout: 60\n"
    "squares: [1, 4, 9, 16]\n"
    "its running workers: 0\n"
    "in a cache scope: 328350\n"
)


def check_migrate(out: str) -> None:
    assert out == MIGRATE_OUTPUT


def check_asyncio_server(out: str) -> None:
    np = pytest.importorskip("numpy")
    linalg = pytest.importorskip("scipy.linalg")
    expected = []
    for seed in range(4):  # what jobs.log_det computes, here
        lu, _ = linalg.lu_factor(np.random.default_rng(seed).standard_normal((300, 300)))
        expected.append(f"{float(np.sum(np.log(np.abs(np.diag(lu))))):.6f}")
    assert out == (
        f"answers: {expected}\n"
        "the same by one map: True\n"
        "a job past its time: timeout\n"
        "retired: {'killed': 1}\n"
        "trio imported: False\n"
    )


def check_bigdata(out: str) -> None:
    assert out.startswith("dataset: 128 MiB, loaded once in the template\nevery job saw the whole dataset: True\n")
    workers = re.findall(r"^a worker: USS ([\d.]+) MiB, RSS (\d+) MiB$", out, re.MULTILINE)
    assert 1 <= len(workers) <= usable_cpus()
    assert len(out.splitlines()) == 2 + len(workers)
    for uss, rss in workers:
        # Each worker read all 128 MiB (in its RSS), none of it its own (USS).
        assert float(uss) < 16 < 128 <= int(rss)


def check_map(out: str) -> None:
    assert out == (
        "map: [3.934693, 6.321206, 8.646647]\n"
        "evaluations: 100000 last: 9516.163034\n"
        # In input order: the loop breaks at the first result above 10,000.
        "imap stopped after 105085 results\n"
        "running workers now: 0\n"
        "error: no solution for x=1234\n"
        "note: raised by __main__.checked on item 1234 of map (counting from 0)\n"
    )


CHECKS = {
    "quickstart.py": check_quickstart,
    "preload.py": check_preload,
    "preload_cost.py": check_preload_cost,
    "recycling.py": check_recycling,
    "kill_on_cancel.py": check_kill_on_cancel,
    "broken_worker.py": check_broken_worker,
    "errors.py": check_errors,
    "spawn.py": check_spawn,
    "migrate.py": check_migrate,
    "bigdata.py": check_bigdata,
    "map.py": check_map,
    "asyncio_server.py": check_asyncio_server,
}


# What these examples show is the template's (Windows has none) or a worker
# killed by SIGKILL (Windows ends processes with an exit code): their output
# on Windows is not the one these pages print.
POSIX_EXAMPLES = {
    "bigdata.py": "a dataset loaded once in the template",
    "preload.py": "the template's preload",
    "preload_cost.py": "what the template's preload saves a fresh worker",
    "recycling.py": "the template's shared pages",
    "broken_worker.py": "a worker killed by SIGKILL",
    "errors.py": "a worker killed by SIGKILL",
    "migrate.py": "a worker killed by SIGKILL",
}


def skip_posix_example_on_windows(name: str) -> None:
    if sys.platform == "win32" and name in POSIX_EXAMPLES:
        pytest.skip(f"{name} shows {POSIX_EXAMPLES[name]}: POSIX only")


@pytest.mark.parametrize("name", scripts())
def test_example(name: str) -> None:
    assert name in CHECKS, f"docs/examples/{name} has no output check in {__file__}"
    skip_posix_example_on_windows(name)
    CHECKS[name](run_example(name))


def test_migrate_example_prints_the_same_on_trio_parallel() -> None:
    skip_posix_example_on_windows("migrate.py")
    if importlib.util.find_spec("trio_parallel") is None:
        pytest.skip("trio-parallel is not installed (it is in the bench extra)")
    assert run_example("migrate.py", "trio_parallel") == MIGRATE_OUTPUT


def captioned_blocks(page: str) -> dict[str, str]:
    """The ``code-block`` directives of a page that carry a ``:caption:`` (a
    file name), as {caption: dedented code}."""
    blocks = {}
    pattern = re.compile(r"^\.\. code-block:: \w+\n    :caption: (\S+)\n\n((?:    .*\n|\n)+)", re.MULTILINE)
    for caption, body in pattern.findall((DOCS / page).read_text()):
        blocks[caption] = textwrap.dedent(body).strip() + "\n"
    return blocks


def test_testing_page_set_up_runs(tmp_path: Path) -> None:
    """The testing page's pyproject.toml and test module, copied as a reader
    would, pass under pytest with the two fixtures."""
    for module in ("pytest_trio", "pytest_benchmark"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the testing page's set-up needs {module} (in the test extra)")
    blocks = captioned_blocks("testing.rst")
    assert set(blocks) == {"pyproject.toml", "test_jobs.py"}
    for name, code in blocks.items():
        (tmp_path / name).write_text(code)
    plugin = "trio_parallel_fs._extras.pytest_plugin"
    loaded_by_entry_point = any(
        entry.value.split(":")[0] == plugin for entry in importlib.metadata.entry_points(group="pytest11")
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "--benchmark-max-time=0.05"]
        + ([] if loaded_by_entry_point else ["-p", plugin]),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=110,
        env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"),
    )
    assert proc.returncode == 0, f"the testing page's example failed:\n{proc.stdout}\n{proc.stderr}"
    assert "5 passed" in proc.stdout, proc.stdout


# --- the docs hold together -------------------------------------------------


def included_examples() -> set[str]:
    names = set()
    for page in DOCS.glob("*.rst"):
        names.update(re.findall(r"literalinclude:: examples/(\S+)", page.read_text()))
    return names


def test_every_check_has_a_script() -> None:
    assert set(CHECKS) <= set(scripts())


def test_every_example_is_shown_in_the_docs_and_exists() -> None:
    shown = included_examples()
    on_disk = {p.name for p in EXAMPLES.glob("*.py")}
    assert set(scripts()) <= shown, f"examples no page includes: {set(scripts()) - shown}"
    assert shown <= on_disk, f"pages include missing files: {shown - on_disk}"


@pytest.mark.parametrize("name", scripts())
def test_example_guards_trio_run(name: str) -> None:
    """trio.run (asyncio.run for the asyncio page) only under ``if __name__ ==
    "__main__":``, so that importing a script (as multiprocessing's spawn does
    with trio-parallel) runs nothing."""
    tree = ast.parse((EXAMPLES / name).read_text())
    guarded = False
    runs = ("trio.run(", "asyncio.run(")
    for node in tree.body:
        code = ast.unparse(node)
        if isinstance(node, ast.If) and ast.unparse(node.test) in (
            "__name__ == '__main__'",
            '__name__ == "__main__"',
        ):
            guarded = guarded or any(run in code for run in runs)
        else:
            assert not any(run in code for run in runs), f"{name} starts its event loop outside the guard"
    assert guarded, f"{name} has no trio.run or asyncio.run under if __name__ == '__main__'"


def test_reference_documents_every_public_name() -> None:
    reference = (DOCS / "reference.rst").read_text()
    missing = [name for name in trio_parallel_fs.__all__ if not re.search(rf":: {name}\b", reference)]
    assert not missing, f"reference.rst does not document: {missing}"


def test_every_configuration_keyword_is_in_the_docs() -> None:
    import attrs

    text = "\n".join(page.read_text() for page in DOCS.glob("*.rst"))
    fields = [field.name for field in attrs.fields(trio_parallel_fs.WorkerConfig)]
    missing = [name for name in fields if f"``{name}``" not in text]
    assert not missing, f"configuration keywords the docs never mention: {missing}"


def test_migration_page_maps_every_trio_parallel_name_and_keyword() -> None:
    if importlib.util.find_spec("trio_parallel") is None:
        pytest.skip("trio-parallel is not installed (it is in the bench extra)")
    import trio_parallel

    page = (DOCS / "migration.rst").read_text()
    names = [name for name in dir(trio_parallel) if not name.startswith("_")]
    missing = [name for name in names if f"``{name}``" not in page]
    keywords = set()
    for name in ["run_sync", "open_worker_context", "cache_scope", "configure_default_context"]:
        fn = getattr(trio_parallel, name)
        fn = getattr(fn, "__wrapped__", fn)
        keywords.update(p for p in inspect.signature(fn).parameters if p not in ("sync_fn", "args"))
    keywords.update(member.name for member in trio_parallel.WorkerType)
    missing += [name for name in sorted(keywords) if f"``{name}``" not in page]
    assert not missing, f"migration.rst does not map: {missing}"


def test_user_facing_text_names_no_internal_document() -> None:
    """Pages, READMEs and the benchmark report speak of measured figures and
    ratios, not of internal design targets or files a user does not have."""
    pages = [*DOCS.glob("*.rst"), ROOT / "README.md", ROOT / "bench" / "README.md"]
    texts = {str(path.relative_to(ROOT)): path.read_text() for path in pages}
    offenders = [name for name, text in texts.items() if "DESIGN.md" in text]
    assert not offenders, f"these name DESIGN.md: {offenders}"


def test_bench_report_shows_ratios_against_peers_and_floor() -> None:
    """``python -m bench``'s ratio table: ours against trio-parallel (spawn and
    forkserver), anyio and the floor; no target or met/not-met column."""
    code = """
from bench._runner import Settings, build_report, render
us = 1e-6
warm = {"tpf-fs": [100 * us], "tpf-spawn": [100 * us], "tp-spawn": [200 * us], "tp-fs": [300 * us],
        "anyio": [150 * us], "thread": [90 * us], "echo": [50 * us]}
report = build_report(Settings.quick_mode(), {"data": {"warm": warm}})
print(render(Settings.quick_mode(), report, {"python": "3", "cpus": 2, "platform": "x"}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    header = r"^case\s+fs vs tp sp\s+fs vs tp fs\s+sp vs tp sp\s+fs vs anyio\s+× floor$"
    assert re.search(header, out, re.MULTILINE), out
    # 200/100, 300/100, 200/100, 150/100 times better; 100/50 floors.
    row = r"^warm call p50, trivial fn\s+2\.00×\s+3\.00×\s+2\.00×\s+1\.50×\s+2\.00×$"
    assert re.search(row, out, re.MULTILINE), out
    for word in ("target", "DESIGN", " met", "NO"):
        assert word not in out, f"{word!r} in the bench report:\n{out}"


def test_docs_build_without_warnings(tmp_path: Path) -> None:
    if importlib.util.find_spec("sphinx") is None:
        pytest.skip("sphinx is not installed: pip install 'sphinx>=7'")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(DOCS),
            str(tmp_path / "html"),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"),
    )
    assert proc.returncode == 0, f"sphinx failed:\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "html" / "index.html").exists()
