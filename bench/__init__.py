"""Benchmarks of trio_parallel_fs side by side with trio-parallel, anyio, threads
and the floors of this machine. Run ``python -m bench --help``.

Kept empty on purpose: workers import ``bench.jobs``, and importing the package
must not drag anything else (trio above all) into them.
"""
