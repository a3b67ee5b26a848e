"""Run by tests/test_prefault.py in a fresh interpreter (it forks, which a
pytest process with threads must not): the plan learned by one forked child,
applied by another. Prints one JSON object."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys

from _trio_parallel_fs_worker import _prefault as pf

PAGES = 64
# Allocated before the book: a mapping the "template" had.
template_data = bytearray(os.urandom(PAGES * pf.PAGE))
address = ctypes.addressof(ctypes.c_char.from_buffer(template_data))
first_page = (address + pf.PAGE - 1) // pf.PAGE * pf.PAGE  # whole pages inside the buffer
shared = mmap.mmap(-1, 4 * pf.PAGE)  # MAP_SHARED: never a target of a write run
shared_address = ctypes.addressof(ctypes.c_char.from_buffer(shared))
mode = sys.argv[1]
if mode == "cap":
    pf.MAX_WRITE_BYTES = 8 * pf.PAGE
book = pf.PlanBook.create()
assert book is not None


def exclusive(page_address: int) -> bool:
    """Whether this process holds its own copy of that page."""
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(page_address // pf.PAGE * 8)
        entry = int.from_bytes(pagemap.read(8), sys.byteorder)
    return bool(entry >> 63 & 1 and entry >> 56 & 1)


def in_child(work) -> dict:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            found = work()
        except BaseException as exc:  # noqa: BLE001 - the test shows it
            found = {"error": repr(exc)}
        os.write(write, json.dumps(found).encode())
        os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 1 << 16):
        data += chunk
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    return json.loads(data)


def learner() -> dict:
    for offset in range(0, 16 * pf.PAGE, pf.PAGE):  # write 16 pages of the old mapping
        template_data[first_page - address + offset] ^= 0xFF
    plan = book.learn()
    book.store(plan)
    return {"writes": plan.writes, "reads": len(plan.reads)}


def applier(stop_at_once: bool, extra_runs: list) -> dict:
    before = [exclusive(first_page + n * pf.PAGE) for n in range(16)]
    found = book.load(count_use=True)
    plan = pf.Plan(found[0].writes + extra_runs, found[0].reads)
    applied = book.apply(plan, lambda: stop_at_once)
    after = [exclusive(first_page + n * pf.PAGE) for n in range(16)]
    return {
        "before": before,
        "after": after,
        "applied": applied,
        "same_data": bytes(template_data) == original,
        "shared_exclusive": exclusive(shared_address),
        "uses": found[1],
    }


original = bytes(template_data)
learned = in_child(learner)
result = {"learned": learned, "first_page": first_page, "mode": mode}
if mode == "apply":
    # A write run in a shared mapping and one in no mapping at all: both skipped.
    extra = [(shared_address, pf.PAGE), (8 * pf.PAGE, pf.PAGE)]
    result["applied"] = in_child(lambda: applier(False, extra))
    result["stopped"] = in_child(lambda: applier(True, []))
    # The worker's entry point: nothing while a message waits at once, the
    # plan when none comes; the waits it asked for.
    pf._book = book
    waits: list = []

    def message_waits(ms: float) -> bool:
        waits.append(ms)
        return True

    def no_message(ms: float) -> bool:
        waits.append(ms)
        return False

    result["busy_worker"] = in_child(lambda: {"applied": pf.prefault_while_idle(message_waits), "waits": waits})
    result["idle_worker"] = in_child(lambda: {"applied": pf.prefault_while_idle(no_message), "waits": waits[:2]})
    result["claims"] = [book.claim_lesson()]
    for _ in range(pf.RELEARN_AFTER):
        book.load(count_use=True)
    # Two workers leave at once: the first learns, the second need not; the
    # old plan stays meanwhile.
    result["claims"] += [book.claim_lesson(), book.claim_lesson()]
    kept = book.load()
    result["kept_writes"] = kept[0].writes == [tuple(run) for run in learned["writes"]]
    empty = pf.PlanBook.create()  # no plan yet: one learner, and an empty plan meanwhile
    result["first_claims"] = [empty.claim_lesson(), empty.claim_lesson()]
    result["meanwhile"] = empty.load()
print(json.dumps(result))
