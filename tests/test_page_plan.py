"""A worker prepared ahead takes the page faults its first job would take
(see _trio_parallel_fs_worker/_page_plan.py). Counted in minor faults and by
/proc/self/pagemap, never timed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import trio

import trio_parallel_fs as tpf
from _trio_parallel_fs_worker import _page_plan

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

pytestmark = pytest.mark.skipif(
    not _page_plan.supported(),
    reason="needs Linux 5.14+ (MADV_POPULATE_WRITE)",
)


def run_script(mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, "page_plan_script.py"), mode],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_plan_names_the_pages_a_worker_copied_and_another_worker_copies_them_ahead():
    found = run_script("apply")
    first_page = found["first_page"]
    written = set(range(first_page, first_page + 16 * _page_plan.PAGE, _page_plan.PAGE))
    assert found["learned"]["asked"]  # the first child, with no plan yet
    learned = {
        address + offset
        for address, length in found["learned"]["writes"]
        for offset in range(0, length, _page_plan.PAGE)
    }
    assert written <= learned
    assert found["learned"]["reads"] > 0  # the interpreter's code pages, at least
    applied = found["applied"]  # the plan the owner published from the lesson
    assert applied["before"] == [False] * 16  # shared with the "template" after the fork
    assert applied["after"] == [True] * 16  # copied by the plan, without a write
    assert applied["same_data"]  # and still the template's bytes
    assert applied["applied"] >= 16 * _page_plan.PAGE
    # The run inside a shared mapping was left alone (and the unmapped one did no harm).
    assert not applied["shared_exclusive"]
    assert not applied["asked"]  # the plan is fresh: nobody learns it again yet


def test_a_published_plan_cannot_be_changed_by_anyone():
    assert run_script("apply")["sealed"] == [
        "write: Operation not permitted",
        "shrink: Operation not permitted",
        "grow: Operation not permitted",
        "map: Operation not permitted",  # a shared writable mapping
    ]


def test_applying_stops_when_a_message_waits():
    stopped = run_script("apply")["stopped"]
    assert stopped["applied"] == 0
    assert stopped["after"] == [False] * 16


def test_a_worker_applies_the_plan_only_after_waiting_a_moment_for_no_message():
    found = run_script("apply")
    assert found["busy_worker"] == {"applied": 0, "waits": [_page_plan.IDLE_FIRST_MS], "closed": True}
    assert found["idle_worker"]["applied"] >= 16 * _page_plan.PAGE
    assert found["idle_worker"]["waits"] == [_page_plan.IDLE_FIRST_MS, 0]
    assert found["idle_worker"]["closed"]  # no job sees the plan's file
    # Every CPU busy (a burst of fresh workers): it looks again now and then,
    # gives up after a while, and the job takes its own faults.
    busy = found["busy_machine"]
    assert busy["applied"] == 0 and busy["closed"]
    assert busy["waits"] == [_page_plan.IDLE_FIRST_MS, _page_plan._BUSY_RETRY_MS]
    retries = math.ceil((_page_plan._BUSY_GIVE_UP_MS - _page_plan.IDLE_FIRST_MS) / _page_plan._BUSY_RETRY_MS)
    assert busy["looks"] == 1 + retries


def test_a_spare_applies_the_plan_while_idle_or_leaves_it_to_its_worker():
    found = run_script("apply")
    # Handed a channel at once: the plan stays for the worker, which applies it.
    handed = found["spare_handed_at_once"]
    assert handed["spare"] == 0 and handed["kept"]
    assert handed["worker"] >= 16 * _page_plan.PAGE and handed["closed"]
    # Idle: the spare applied it, and the worker neither waits nor applies again.
    idle = found["idle_spare"]
    assert idle["spare"] >= 16 * _page_plan.PAGE and not idle["kept"]
    assert idle["worker"] == 0 and idle["worker_waits"] == [] and idle["closed"]


@pytest.mark.parametrize(("beyond_cpus", "idle"), [(None, True), (-1, True), (0, False), (3, False)])
def test_a_cpu_is_idle_while_fewer_other_tasks_than_cpus_are_runnable(tmp_path, monkeypatch, beyond_cpus, idle):
    """``beyond_cpus``: how many more tasks than the host's CPUs run beside us (None: none at all)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    others = 0 if beyond_cpus is None else 4 + beyond_cpus
    loadavg = tmp_path / "loadavg"
    loadavg.write_text(f"0.52 0.58 0.59 {others + 1}/467 12345\n")  # the count includes the reader
    assert _page_plan.cpu_to_spare(str(loadavg)) is idle


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity here")
def test_idle_cpus_are_judged_on_the_host_whatever_cpus_this_process_may_use(tmp_path, monkeypatch):
    """/proc/loadavg counts the host's runnable tasks: under taskset (or a
    cpuset) they are compared with the host's CPUs, not with the fewer this
    process may use, which called a host with 3 of 8 CPUs busy "every CPU busy"."""
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("0.52 0.58 0.59 4/467 12345\n")  # 3 others and the reader
    assert _page_plan.cpu_to_spare(str(loadavg)) is True
    loadavg.write_text("0.52 0.58 0.59 9/467 12345\n")  # 8 others: every CPU of the host busy
    assert _page_plan.cpu_to_spare(str(loadavg)) is False


def test_a_loadavg_that_cannot_be_read_leaves_the_plan_on(tmp_path):
    garbled = tmp_path / "loadavg"
    garbled.write_text("nonsense\n")
    assert _page_plan.cpu_to_spare(str(garbled)) is True
    assert _page_plan.cpu_to_spare(str(tmp_path / "missing")) is True


def test_a_plan_is_learned_again_after_enough_forks_by_one_child_at_a_time():
    found = run_script("apply")
    # One child asked once RELEARN_AFTER were forked with the plan, none after
    # it (one at a time); the old plan stays meanwhile.
    assert found["asked"].count(True) == 1
    assert found["kept_plan"]
    assert found["asked_again"]  # that learner left without a lesson
    # With no plan: the first child is asked; one that never reports is given
    # up after RELEARN_AFTER more forks.
    assert found["fresh_asks"] == [True] + [False] * _page_plan.RELEARN_AFTER + [True]


def test_the_private_pages_a_plan_copies_are_capped():
    writes = run_script("cap")["learned"]["writes"]
    assert sum(length for _, length in writes) == 8 * _page_plan.PAGE


async def test_a_prepared_fresh_worker_takes_its_jobs_faults_before_the_job():
    faults: list[int] = []
    async with tpf.open_worker_context(preload=["page_plan_objects"], max_jobs=1) as ctx:
        # A plan is applied only while a CPU is idle (see cpu_to_spare): on a
        # loaded machine a successor may find none, so give it a few more
        # rounds (quiet, the third is enough).
        for _ in range(12):
            # Time for the retiring worker to learn and its successor to apply.
            await trio.sleep(0.3)
            total, taken = await ctx.run_sync(_walk)
            assert total == sum(float(n) for n in range(200_000))
            faults.append(taken)
            if len(faults) > 2 and taken < faults[0] / 10:
                break
    # The first worker copies ~2000 pages of the template's objects; a successor
    # that applied the plan finds them copied already.
    assert faults[0] > 1000
    assert min(faults[2:]) < faults[0] / 10, faults


def _walk() -> tuple[float, int]:
    import page_plan_objects

    return page_plan_objects.walk_objects()
