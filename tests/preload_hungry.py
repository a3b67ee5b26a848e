"""A preload that takes 200 MiB (touched, so it counts in USS), then waits:
a memory ceiling below that kills it while it preloads."""

import time

HELD = bytearray(200 << 20)
for offset in range(0, len(HELD), 4096):
    HELD[offset] = 1
time.sleep(30)
