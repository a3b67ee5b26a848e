"""A preload that ends its process (exit code 9) once the file named by
TPF_TEST_EXIT_MARKER exists: the workers started before that load it."""

import os

_marker = os.environ.get("TPF_TEST_EXIT_MARKER")
if _marker and os.path.exists(_marker):
    os._exit(9)
