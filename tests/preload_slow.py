"""Imported by a template's preload in tests: a preload that takes a minute,
and says where it runs first so that a test knows the start-up has begun."""

import os
import time

marker = os.environ.get("TPF_TEST_SLOW_PRELOAD_MARKER")
if marker:
    with open(marker, "w") as file:
        file.write(str(os.getpid()))
time.sleep(60)
