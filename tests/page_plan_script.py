"""Run by tests/test_page_plan.py in a fresh interpreter (it forks, which a
pytest process with threads must not): this process plays the template (the
plan's owner); one forked child learns and sends its lesson, the owner
publishes it, others apply it. Prints one JSON object."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys

from _trio_parallel_fs_worker import _page_plan as pf

PAGES = 64
# Allocated before the owner: a mapping the "template" had.
template_data = bytearray(os.urandom(PAGES * pf.PAGE))
address = ctypes.addressof(ctypes.c_char.from_buffer(template_data))
first_page = (address + pf.PAGE - 1) // pf.PAGE * pf.PAGE  # whole pages inside the buffer
shared = mmap.mmap(-1, 4 * pf.PAGE)  # MAP_SHARED: never a target of a write run
shared_address = ctypes.addressof(ctypes.c_char.from_buffer(shared))
mode = sys.argv[1]
if mode == "cap":
    pf.MAX_WRITE_BYTES = 8 * pf.PAGE
owner = pf.open_book()
assert owner is not None


def exclusive(page_address: int) -> bool:
    """Whether this process holds its own copy of that page."""
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(page_address // pf.PAGE * 8)
        entry = int.from_bytes(pagemap.read(8), sys.byteorder)
    return bool(entry >> 63 & 1 and entry >> 56 & 1)


def in_child(work) -> dict:
    """Fork as the template does (telling the owner), run ``work`` in the
    child, then reap it as the template does; what ``work`` returned."""
    read, write = os.pipe()
    lesson = owner.before_fork()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        owner.in_child(lesson)
        try:
            found = work()
        except BaseException as exc:  # noqa: BLE001 - the test shows it
            found = {"error": repr(exc)}
        os.write(write, json.dumps(found).encode())
        os._exit(0)
    owner.forked(pid, lesson)
    os.close(write)
    data = b""
    while chunk := os.read(read, 1 << 16):
        data += chunk
    os.close(read)
    _, status = os.waitpid(pid, 0)
    owner.exited(pid)
    assert status == 0
    return json.loads(data)


def learner() -> dict:
    for offset in range(0, 16 * pf.PAGE, pf.PAGE):  # write 16 pages of the old mapping
        template_data[first_page - address + offset] ^= 0xFF
    asked = pf._inherited is not None and pf._inherited.lesson is not None
    plan = pf.learn(owner.mappings)
    pf.learn_before_leaving()  # sends the same plan to the owner
    return {"asked": asked, "writes": plan.writes, "reads": len(plan.reads)}


def applier(stop_at_once: bool, extra_runs: list) -> dict:
    before = [exclusive(first_page + n * pf.PAGE) for n in range(16)]
    assert pf._inherited is not None and pf._inherited.plan_fd is not None
    found = pf.read_plan(pf._inherited.plan_fd)
    assert found is not None
    plan = pf.Plan(found.writes + extra_runs, found.reads)
    applied = pf.apply(plan, owner.mappings, lambda: stop_at_once)
    after = [exclusive(first_page + n * pf.PAGE) for n in range(16)]
    return {
        "before": before,
        "after": after,
        "applied": applied,
        "same_data": bytes(template_data) == original,
        "shared_exclusive": exclusive(shared_address),
        "asked": pf._inherited.lesson is not None,
    }


def sealed() -> list[str]:
    """What a child can do to its plan's file (and to a reopened copy)."""
    assert pf._inherited is not None and pf._inherited.plan_fd is not None
    fd = os.open(f"/proc/self/fd/{pf._inherited.plan_fd}", os.O_RDWR)
    found = []
    for name, action in (
        ("write", lambda: os.pwrite(fd, b"x", 0)),
        ("shrink", lambda: os.ftruncate(fd, 0)),
        ("grow", lambda: os.ftruncate(fd, 1 << 30)),
        ("map", lambda: mmap.mmap(fd, 0)),  # MAP_SHARED, writable
    ):
        try:
            action()
            found.append(f"{name}: done")
        except OSError as exc:
            found.append(f"{name}: {exc.strerror}")
    os.close(fd)
    return found


original = bytes(template_data)
learned = in_child(learner)
result = {"learned": learned, "first_page": first_page, "mode": mode}
if mode == "apply":
    # A write run in a shared mapping and one in no mapping at all: both skipped.
    extra = [(shared_address, pf.PAGE), (8 * pf.PAGE, pf.PAGE)]
    result["applied"] = in_child(lambda: applier(False, extra))
    result["stopped"] = in_child(lambda: applier(True, []))
    result["sealed"] = in_child(sealed)
    # The worker's entry point: nothing while a message waits at once, the
    # plan when none comes; the waits it asked for; its fd closed either way.
    waits: list = []

    def message_waits(ms: float) -> bool:
        waits.append(ms)
        return True

    def no_message(ms: float) -> bool:
        waits.append(ms)
        return False

    def entry(input_within) -> dict:
        fd = pf._inherited.plan_fd
        applied = pf.apply_plan_while_idle(input_within)
        return {"applied": applied, "waits": waits[:2], "closed": not os.path.exists(f"/proc/self/fd/{fd}")}

    looks = []

    def every_cpu_busy() -> bool:
        looks.append(1)
        return False

    result["busy_worker"] = in_child(lambda: entry(message_waits))
    # Whether a CPU is idle is the machine's business: each case says it.
    pf.cpu_to_spare = lambda: True
    result["idle_worker"] = in_child(lambda: entry(no_message))
    waits.clear()
    pf.cpu_to_spare = every_cpu_busy
    result["busy_machine"] = in_child(lambda: {**entry(no_message), "looks": len(looks)})
    # A spare applies the plan while it waits for its channel, or leaves it
    # to the worker it becomes; then the worker's entry point as above.

    def spare_then_worker(channel_within) -> dict:
        fd = pf._inherited.plan_fd
        as_spare = pf.apply_plan_while_idle(channel_within, spare=True)
        kept = pf._inherited.plan_fd is not None and os.path.exists(f"/proc/self/fd/{fd}")
        waits.clear()
        as_worker = pf.apply_plan_while_idle(no_message)
        return {
            "spare": as_spare,
            "kept": kept,
            "worker": as_worker,
            "worker_waits": list(waits),
            "closed": not os.path.exists(f"/proc/self/fd/{fd}"),
        }

    pf.cpu_to_spare = lambda: True
    result["spare_handed_at_once"] = in_child(lambda: spare_then_worker(message_waits))
    result["idle_spare"] = in_child(lambda: spare_then_worker(no_message))
    # Five children forked with this plan so far. Until RELEARN_AFTER were,
    # none is asked to learn; then one, and not the next (one at a time),
    # while the old plan stays.
    plan_fd = owner.plan_fd
    asked = []
    for pid in range(10**6, 10**6 + pf.RELEARN_AFTER):  # pretend forks
        lesson = owner.before_fork()
        asked.append(lesson is not None)
        owner.forked(pid, lesson)
    result["asked"] = asked
    result["kept_plan"] = owner.plan_fd == plan_fd
    # A learner that leaves without a lesson: the next fork asks again.
    owner.exited(10**6 + asked.index(True))
    result["asked_again"] = owner.before_fork() is not None
    owner.forked(10**6 + 100, None)  # (that "fork" failed: nobody asked)
    # No plan yet: a child is asked at once, and none other while it has not
    # reported, until RELEARN_AFTER more forks: then it is given up.
    fresh = pf.PlanOwner(owner.mappings)
    result["fresh_asks"] = [fresh.before_fork() is not None for _ in range(pf.RELEARN_AFTER + 2)]
print(json.dumps(result))
