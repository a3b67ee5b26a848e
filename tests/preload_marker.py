"""Imported by a template's preload in tests: records which process imported it."""

import os

IMPORTED_IN = os.getpid()
