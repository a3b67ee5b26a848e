"""Entry point: ``python -m _trio_parallel_fs_worker (template|worker) FD [--die-with-parent]``."""

import sys

from ._main import main

sys.exit(main(sys.argv[1:]))
