"""Entry point of the child processes.

The parent runs this package's directory as a script
(``python /path/to/_trio_parallel_fs_worker template FD``), so that ``ps``
shows what each process is. Python then puts the package's own directory on
sys.path; it is replaced by its parent, from which the package imports.
"""

import os
import sys

if not __package__:
    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0]) == _here:
        sys.path[0] = os.path.dirname(_here)
    else:
        sys.path.insert(0, os.path.dirname(_here))
    from _trio_parallel_fs_worker._main import main
else:  # python -m _trio_parallel_fs_worker
    from ._main import main

sys.exit(main(sys.argv[1:]))
