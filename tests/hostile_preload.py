"""Preloaded by the templates of tests/test_isolation.py: a 512 MiB writable
private mapping the template has but never touches (it costs no memory), so
that a hostile plan can name a run of that size inside a mapping of the right
kind, as a real template with a big heap would have one."""

from __future__ import annotations

import ctypes
import mmap

SIZE = 512 << 20
_AREA = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
ADDRESS = ctypes.addressof(ctypes.c_char.from_buffer(_AREA))
