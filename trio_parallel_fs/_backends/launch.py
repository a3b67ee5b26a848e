"""How the parent starts a child interpreter (the template, or a spawned
worker): its command line and its environment, one rule for both backends.

The command runs the child package's directory as a script
(``python /…/_trio_parallel_fs_worker template 5``): ``ps -ef`` then says what
each process is, and the package is found wherever this parent imported it
from, without touching PYTHONPATH (which the user's own subprocesses would
inherit).
"""

from __future__ import annotations

import os
import sys

import _trio_parallel_fs_worker

CHILD_PACKAGE = os.path.dirname(os.path.abspath(_trio_parallel_fs_worker.__file__))

# Thread pools that numerical libraries start at import time. Capped in the
# children's environment (unless the user set them) so that the template stays
# single-threaded and N workers do not run N x cores BLAS threads.
THREAD_LIMIT_VARIABLES = (
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def child_command(role: str, *args: str) -> list[str]:
    """``role`` is ``"template"`` or ``"worker"``; ``args`` follow it."""
    return [sys.executable, CHILD_PACKAGE, role, *args]


def child_environment(blas_threads: int | None) -> dict[str, str]:
    """The parent's environment of this moment, with the BLAS thread caps."""
    env = dict(os.environ)
    if blas_threads is not None:
        for name in THREAD_LIMIT_VARIABLES:
            env.setdefault(name, str(blas_threads))
    return env
