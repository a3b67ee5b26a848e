"""How a job's function is named in messages: the one rule both ends use."""

from _trio_parallel_fs_worker._describe import describe as describe

__all__ = ["describe"]
