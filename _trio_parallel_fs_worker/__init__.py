"""The child side of trio_parallel_fs: the template and the worker loop.

Everything here runs in processes the parent starts. It depends on the standard
library, cloudpickle and (for memory figures off Linux) psutil, and never on
trio: a test checks that ``trio`` is absent from a worker's ``sys.modules``.
"""
